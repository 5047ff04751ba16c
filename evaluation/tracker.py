"""Incremental trackers: the accuracy matrix over evaluation points, prequential accuracy."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from evaluation import metrics


@dataclass(frozen=True)
class PointSummary:
    """Metrics at one evaluation point."""

    samples_seen: int
    average_accuracy: float
    average_forgetting: float
    backward_transfer: float


class AccuracyMatrix:
    """Grow `R` one evaluation point at a time and keep which groups each interval trained."""

    def __init__(self, num_groups: int):
        self.num_groups = num_groups
        self.rows: list[np.ndarray] = []
        self.points: list[int] = []
        self.seen = np.zeros(num_groups, dtype=bool)
        self.learned_at = np.full(num_groups, -1, dtype=np.int64)
        self._trained_since_last = np.zeros(num_groups, dtype=bool)
        self._newest = np.zeros(num_groups, dtype=bool)

    def observe(self, groups: np.ndarray) -> None:
        """Record that samples of these groups were trained on since the last point."""
        self._trained_since_last[groups] = True

    def update(self, row: np.ndarray, samples_seen: int) -> PointSummary:
        """Append the accuracies `[G]` measured now."""
        if row.shape != (self.num_groups,):
            raise ValueError(f"expected {self.num_groups} group accuracies, got {row.shape}")
        point = len(self.rows)
        self.rows.append(row.astype(np.float64))
        self.points.append(samples_seen)
        self.seen |= self._trained_since_last
        self.learned_at[self._trained_since_last] = point
        self._newest = self._trained_since_last
        self._trained_since_last = np.zeros(self.num_groups, dtype=bool)
        return self.get()

    @property
    def matrix(self) -> np.ndarray:
        return np.array(self.rows).reshape(len(self.rows), self.num_groups)

    def group_forgetting(self) -> np.ndarray:
        """Forgetting `[G]` at the last point; NaN for groups unseen or still being learned."""
        if not self.rows:
            return np.full(self.num_groups, np.nan)
        last = len(self.rows) - 1
        finished = self.seen & ~self._newest
        return np.where(finished, metrics.forgetting(self.matrix, last), np.nan)

    def get(self) -> PointSummary:
        if not self.rows:
            return PointSummary(0, 0.0, 0.0, 0.0)
        matrix = self.matrix
        last = len(self.rows) - 1
        return PointSummary(
            samples_seen=self.points[-1],
            average_accuracy=metrics.average_accuracy(matrix[last], self.seen),
            average_forgetting=metrics.average_forgetting(matrix, last, self.seen, self._newest),
            backward_transfer=metrics.backward_transfer(matrix, self.learned_at),
        )


class PrequentialAccuracy:
    """Test-then-train accuracy: cumulative and over the last `window` samples."""

    def __init__(self, window: int = 1000):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self._recent: deque[bool] = deque(maxlen=window)
        self._recent_correct = 0
        self.correct = 0
        self.total = 0

    def update(self, correct: np.ndarray) -> None:
        for hit in correct.tolist():
            if len(self._recent) == self.window:
                self._recent_correct -= self._recent[0]
            self._recent.append(bool(hit))
            self._recent_correct += bool(hit)
        self.correct += int(correct.sum())
        self.total += len(correct)

    def get(self) -> float:
        """Cumulative accuracy so far (0.0 before any sample)."""
        return self.correct / self.total if self.total else 0.0

    def get_windowed(self) -> float:
        return self._recent_correct / len(self._recent) if self._recent else 0.0
