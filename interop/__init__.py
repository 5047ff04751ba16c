"""Bridges to other continual-learning libraries, each imported only on demand."""
