"""Incremental trackers: the accuracy matrix over evaluation points, prequential accuracy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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

    def state_dict(self) -> dict[str, Any]:
        return {
            "rows": [row.tolist() for row in self.rows],
            "points": list(self.points),
            "seen": self.seen.tolist(),
            "learned_at": self.learned_at.tolist(),
            "trained_since_last": self._trained_since_last.tolist(),
            "newest": self._newest.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = [np.array(row, dtype=np.float64) for row in state["rows"]]
        self.points = [int(p) for p in state["points"]]
        self.seen = np.array(state["seen"], dtype=bool)
        self.learned_at = np.array(state["learned_at"], dtype=np.int64)
        self._trained_since_last = np.array(state["trained_since_last"], dtype=bool)
        self._newest = np.array(state["newest"], dtype=bool)

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
    """Test-then-train accuracy: cumulative and over the last `window` samples.

    The window is a ring buffer of hits, so an update costs O(batch), not O(window).
    """

    def __init__(self, window: int = 1000):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self._ring = np.zeros(window, dtype=bool)
        self._next = 0
        self._filled = 0
        self._recent_correct = 0
        self.correct = 0
        self.total = 0

    def update(self, correct: np.ndarray) -> None:
        """Add the hits `[B]` (bool) of one test-then-train batch."""
        hits = correct[-self.window :]
        slots = (self._next + np.arange(len(hits))) % self.window
        self._recent_correct += int(hits.sum()) - int(self._ring[slots].sum())
        self._ring[slots] = hits
        self._next = (self._next + len(hits)) % self.window
        self._filled = min(self.window, self._filled + len(hits))
        self.correct += int(correct.sum())
        self.total += len(correct)

    def get(self) -> float:
        """Cumulative accuracy so far (0.0 before any sample)."""
        return self.correct / self.total if self.total else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "ring": self._ring.tolist(),
            "next": self._next,
            "filled": self._filled,
            "recent_correct": self._recent_correct,
            "correct": self.correct,
            "total": self.total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ring = np.array(state["ring"], dtype=bool)
        self._next, self._filled = int(state["next"]), int(state["filled"])
        self._recent_correct = int(state["recent_correct"])
        self.correct, self.total = int(state["correct"]), int(state["total"])

    def get_windowed(self) -> float:
        return self._recent_correct / self._filled if self._filled else 0.0
