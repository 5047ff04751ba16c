"""Continual-learning metrics, probe evaluation and reports; takes a predict callable."""
