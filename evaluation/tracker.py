"""Incremental trackers: the accuracy matrix over evaluation points, prequential accuracy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from streamcl.evaluation import metrics


@dataclass(frozen=True)
class PointSummary:
    """Metrics at one evaluation point."""

    samples_seen: int
    average_accuracy: float
    average_forgetting: float
    backward_transfer: float


RECENT_POINTS = 200
"""Evaluation points whose rows (and curve points) a run keeps besides each group's first.

A weeks-long service evaluates every `eval_every` samples; its checkpoints and reports
hold at most this many recent points, so their size does not grow with the run's age."""


class AccuracyMatrix:
    """Grow `R` one evaluation point at a time and keep which groups each interval trained.

    The metrics need only running summaries of `R` (the latest row, each group's best
    accuracy before it, each group's accuracy at the point it was last trained), so the
    tracker is bounded: `rows` / `points` keep the row at which each group was first
    trained (at most G, the milestones of the report's matrix) and the `recent` latest
    rows; older rows are dropped. `evaluations` counts every point; `learned_at` holds
    global point indices.
    """

    def __init__(self, num_groups: int, recent: int = RECENT_POINTS):
        if recent < 1:
            raise ValueError(f"recent must be >= 1 row, got {recent}")
        self.num_groups = num_groups
        self.recent = recent
        self.rows: list[np.ndarray] = []
        self.points: list[int] = []
        self.evaluations = 0
        self.seen = np.zeros(num_groups, dtype=bool)
        self.learned_at = np.full(num_groups, -1, dtype=np.int64)
        self._first: list[bool] = []  # per kept row: some group was first trained there
        self._best = np.full(num_groups, -np.inf)  # max of R[k, g] over k < latest point
        self._at_learned = np.zeros(num_groups)  # R[learned_at[g], g]
        self._trained_since_last = np.zeros(num_groups, dtype=bool)
        self._newest = np.zeros(num_groups, dtype=bool)

    def observe(self, groups: np.ndarray) -> None:
        """Record that samples of these groups were trained on since the last point."""
        self._trained_since_last[groups] = True

    def update(self, row: np.ndarray, samples_seen: int) -> PointSummary:
        """Add the accuracies `[G]` measured now."""
        if row.shape != (self.num_groups,):
            raise ValueError(f"expected {self.num_groups} group accuracies, got {row.shape}")
        row = row.astype(np.float64)
        if self.rows:
            self._best = np.maximum(self._best, self.rows[-1])
        trained = self._trained_since_last
        self.rows.append(row)
        self.points.append(samples_seen)
        self._first.append(bool((trained & ~self.seen).any()))
        self.seen |= trained
        self.learned_at[trained] = self.evaluations
        self._at_learned[trained] = row[trained]
        self._newest = trained
        self._trained_since_last = np.zeros(self.num_groups, dtype=bool)
        self.evaluations += 1
        self._drop_old_rows()
        return self.get()

    def _drop_old_rows(self) -> None:
        """Keep first-trained rows and the `recent` latest; drop the oldest other row."""
        if len(self.rows) - sum(self._first) <= self.recent:
            return
        oldest = self._first.index(False)
        del self.rows[oldest], self.points[oldest], self._first[oldest]

    @property
    def matrix(self) -> np.ndarray:
        """The kept rows of `R` `[kept, G]` (all of them until `recent` is exceeded)."""
        return np.array(self.rows).reshape(len(self.rows), self.num_groups)

    def _forgetting(self) -> np.ndarray:
        """`max_{k<i} R[k, g] - R[i, g]` `[G]` at the latest point i; zeros at the first."""
        if self.evaluations == 1:
            return np.zeros(self.num_groups)
        return self._best - self.rows[-1]

    def group_forgetting(self) -> np.ndarray:
        """Forgetting `[G]` at the last point; NaN for groups unseen or still being learned."""
        if not self.rows:
            return np.full(self.num_groups, np.nan)
        finished = self.seen & ~self._newest
        return np.where(finished, self._forgetting(), np.nan)

    def undefined_groups(self) -> np.ndarray:
        """Seen groups `[k]` whose accuracy was undefined (NaN: no probe sample) at a point
        the summaries use: the latest, their best before it, or their last trained."""
        if not self.rows:
            return np.zeros(0, dtype=np.int64)
        nan = np.isnan(self.rows[-1]) | np.isnan(self._best) | np.isnan(self._at_learned)
        return np.flatnonzero(self.seen & nan)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rows": [row.tolist() for row in self.rows],
            "points": list(self.points),
            "first": list(self._first),
            "evaluations": self.evaluations,
            "seen": self.seen.tolist(),
            "learned_at": self.learned_at.tolist(),
            "best": self._best.tolist(),
            "at_learned": self._at_learned.tolist(),
            "trained_since_last": self._trained_since_last.tolist(),
            "newest": self._newest.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = [np.array(row, dtype=np.float64) for row in state["rows"]]
        self.points = [int(p) for p in state["points"]]
        self._first = [bool(f) for f in state["first"]]
        self.evaluations = int(state["evaluations"])
        self.seen = np.array(state["seen"], dtype=bool)
        self.learned_at = np.array(state["learned_at"], dtype=np.int64)
        self._best = np.array(state["best"], dtype=np.float64)
        self._at_learned = np.array(state["at_learned"], dtype=np.float64)
        self._trained_since_last = np.array(state["trained_since_last"], dtype=bool)
        self._newest = np.array(state["newest"], dtype=bool)

    def get(self) -> PointSummary:
        """The metrics of DESIGN.md at the latest point, from the running summaries."""
        if not self.rows:
            return PointSummary(0, 0.0, 0.0, 0.0)
        latest = self.rows[-1]
        eligible = self.seen & ~self._newest
        finished = (self.learned_at >= 0) & (self.learned_at < self.evaluations - 1)
        return PointSummary(
            samples_seen=self.points[-1],
            average_accuracy=metrics.average_accuracy(latest, self.seen),
            average_forgetting=float(self._forgetting()[eligible].mean())
            if eligible.any()
            else 0.0,
            backward_transfer=float(np.mean(latest[finished] - self._at_learned[finished]))
            if finished.any()
            else 0.0,
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
        start, stop = self._next, self._next + len(hits)
        if stop <= self.window:  # no wrap: slices, not an index array
            leaving = int(np.count_nonzero(self._ring[start:stop]))
            self._ring[start:stop] = hits
        else:
            slots = np.arange(start, stop) % self.window
            leaving = int(np.count_nonzero(self._ring[slots]))
            self._ring[slots] = hits
        recent = int(np.count_nonzero(hits))
        self._recent_correct += recent - leaving
        self._next = stop % self.window
        self._filled = min(self.window, self._filled + len(hits))
        self.correct += recent if len(hits) == len(correct) else int(np.count_nonzero(correct))
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
