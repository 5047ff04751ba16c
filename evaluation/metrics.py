"""Continual-learning metrics as pure functions over the accuracy matrix.

`R[i, g]` is the accuracy on group g's held-out probe after evaluation point i
(rows are points, columns groups). Definitions follow DESIGN.md:

- average accuracy at i: mean of `R[i, g]` over the groups seen by point i;
- forgetting of g at i: `max_{k<i} R[k, g] - R[i, g]`;
- average forgetting at i: mean forgetting over seen groups except the newest, where
  "newest" means trained on since the previous point (still being learned);
- backward transfer: mean over groups g finished before the last point T of
  `R[T, g] - R[t_g, g]`, t_g the last point whose interval trained g
  (Lopez-Paz & Ranzato 2017, GEM).
"""

from __future__ import annotations

import numpy as np


def average_accuracy(row: np.ndarray, seen: np.ndarray) -> float:
    """Mean accuracy over seen groups; row, seen: `[G]`. 0.0 when nothing is seen yet."""
    return float(row[seen].mean()) if seen.any() else 0.0


def forgetting(matrix: np.ndarray, point: int) -> np.ndarray:
    """Per-group forgetting `[G]` at `point`; zeros at the first point."""
    if point == 0:
        return np.zeros(matrix.shape[1])
    return matrix[:point].max(axis=0) - matrix[point]


def average_forgetting(
    matrix: np.ndarray, point: int, seen: np.ndarray, newest: np.ndarray
) -> float:
    """Mean forgetting at `point` over groups that are seen and not newest (masks `[G]`)."""
    eligible = seen & ~newest
    return float(forgetting(matrix, point)[eligible].mean()) if eligible.any() else 0.0


def backward_transfer(matrix: np.ndarray, learned_at: np.ndarray) -> float:
    """BWT at the last point; learned_at: `[G]` t_g per group, -1 if never trained."""
    last = matrix.shape[0] - 1
    groups = np.flatnonzero((learned_at >= 0) & (learned_at < last))
    if not len(groups):
        return 0.0
    return float(np.mean(matrix[last, groups] - matrix[learned_at[groups], groups]))
