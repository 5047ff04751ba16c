"""Replay memory: a fixed-budget store plus a selector that decides what to keep."""
