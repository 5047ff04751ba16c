"""A learning session: batching, task-boundary evaluation and the accounting of every message.

Shared by `replay` (recorded streams) and `serve` (Kafka), so both learn and measure
the same way: every message ends up learned, quarantined or rejected with a reason.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import numpy as np

from streamcl.deploy.runtime.pending import row, stacked
from streamcl.deploy.runtime.session_state import load_session_state, session_state
from streamcl.evaluation.probes import ProbeResult, evaluate
from streamcl.evaluation.report import head_tail, metric_section
from streamcl.evaluation.reservoir import ProbeReservoir
from streamcl.evaluation.tracker import RECENT_POINTS, AccuracyMatrix, PrequentialAccuracy
from streamcl.ingest.heldout import HeldOut
from streamcl.ingest.schema import Batch, Sample
from streamcl.learner.loop import LearnResult, OnlineLearner
from streamcl.learner.quarantine import Quarantine
from streamcl.learner.tasks import TaskFollower

log = logging.getLogger(__name__)
TIMING_KEYS = ("samples_per_second", "evaluation_seconds", "wall_seconds")


class LearningSession:
    """Feed samples in arrival order; learn in batches; evaluate at boundaries and every N."""

    def __init__(
        self,
        learner: OnlineLearner,
        heldout: HeldOut | None,
        batch_size: int,
        eval_every: int | None = None,
        prequential_window: int = 1000,
        on_learned: Callable[[Batch, float], None] | None = None,
        probe: ProbeReservoir | None = None,
        on_evaluated: Callable[[LearningSession], None] | None = None,
        on_quarantined: Callable[[Batch, np.ndarray, tuple[str, ...]], None] | None = None,
    ):
        self.learner = learner
        self.heldout = heldout
        self.batch_size = batch_size
        self.eval_every = eval_every
        self.on_learned = on_learned
        self.on_evaluated = on_evaluated
        self.on_quarantined = on_quarantined
        self.filtering = FilterAccounting(heldout.train_corrupted if heldout is not None else None)
        self.probe = probe if heldout is None else None
        # Groups: the held-out set's (tasks, usually); a diverted probe's are classes.
        self.group_kind = heldout.group_kind if heldout is not None else "class"
        if heldout is not None:
            num_groups = int(heldout.groups.max()) + 1
        else:
            num_groups = learner.spec.num_classes if self.probe is not None else 0
        self.matrix = AccuracyMatrix(num_groups)
        self.prequential = PrequentialAccuracy(prequential_window)
        self.rejected: Counter[str] = Counter()
        self.samples_seen = 0
        self.samples_learned = 0
        self.samples_held_out = 0
        self.class_counts = np.zeros(learner.spec.num_classes, dtype=np.int64)
        # The latest evaluation points only: a service evaluates for weeks.
        self.curve: deque[dict[str, float]] = deque(maxlen=RECENT_POINTS)
        self.final_probe: ProbeResult | None = None
        self.evaluation_seconds = 0.0
        # Samples offered one by one, or row ranges of batches: at most `batch_size` rows.
        self._pending: list[Sample | Batch] = []
        self._pending_rows = 0
        # The learner's rule, its window: both see the same samples, so they agree.
        self._tasks = TaskFollower(learner.tasks.window)
        self._next_eval = eval_every or 0
        self._evaluated_at = -1

    @property
    def pending(self) -> int:
        """Valid samples waiting for their batch to fill."""
        return self._pending_rows

    @property
    def samples_rejected(self) -> int:
        """Rejected as invalid (decoding, validation); noisy rejections are counted apart."""
        return sum(self.rejected.values())

    def accounting_holds(self) -> bool:
        """seen = learned + in quarantine + rejected (noisy) + rejected (invalid)
        + held out + pending: every message is in exactly one place."""
        return self.samples_seen == (
            self.samples_learned
            + self.in_quarantine
            + self.filtering.counts["rejected_noisy"]
            + self.samples_rejected
            + self.samples_held_out
            + self.pending
        )

    @property
    def in_quarantine(self) -> int:
        return len(self.learner.quarantine) if self.learner.quarantine is not None else 0

    def offer(self, sample: Sample) -> bool:
        """Queue one valid sample; learn when a batch is full, evaluate at task boundaries.

        A boundary is a task id arriving (`TaskFollower`), not a flip between the tasks of
        interleaved partitions. Returns False when the sample was held out into the probe.
        """
        self.samples_seen += 1
        if self.probe is not None and self.probe.offer(sample.features, sample.label):
            self.samples_held_out += 1
            return False
        if self._tasks.arrives(sample.task):
            self.flush()
            self.evaluate()
        self._pending.append(sample)
        self._pending_rows += 1
        self.class_counts[sample.label] += 1
        if self._pending_rows >= self.batch_size:
            self.flush()
        return True

    def offer_batch(self, batch: Batch) -> list[int]:
        """Queue valid samples `[n]` in arrival order: the same as `offer` on each row,
        without a per-sample object. Returns the rows held out into the probe."""
        if self.probe is not None:  # the probe diverts sample by sample
            return [i for i in range(len(batch)) if not self.offer(row(batch, i))]
        self.samples_seen += len(batch)
        self.class_counts += np.bincount(batch.labels, minlength=len(self.class_counts))
        start = 0
        for i in self._tasks.arriving(batch.tasks):
            self._queue(batch, start, i)
            self.flush()
            self.evaluate()
            start = i
        self._queue(batch, start, len(batch))
        return []

    def _queue(self, batch: Batch, start: int, stop: int) -> None:
        """Queue rows `start:stop`, learning each time a batch fills."""
        while start < stop:
            take = min(stop - start, self.batch_size - self._pending_rows)
            self._pending.append(batch.rows(start, start + take))
            self._pending_rows += take
            start += take
            if self._pending_rows >= self.batch_size:
                self.flush()

    def reject(self, reason: str, count: int = 1) -> None:
        """Account for `count` messages rejected for `reason` (an unreadable batch: several)."""
        self.samples_seen += count
        self.rejected[reason] += count

    def flush(self) -> None:
        """Learn whatever is pending (a partial batch at a boundary or before a checkpoint)."""
        if not self._pending:
            return
        batch = stacked(self._pending)
        self._pending, self._pending_rows = [], 0
        started = time.perf_counter()
        result = self.learner.learn(batch)
        seconds = time.perf_counter() - started
        self.prequential.update(result.predictions == batch.labels)
        self.samples_learned += result.learned
        self.filtering.update(batch, result)
        if self.on_quarantined is not None and result.quarantine_reasons:
            self.on_quarantined(batch, np.flatnonzero(~result.admitted), result.quarantine_reasons)
        if self.matrix.num_groups:
            groups = batch.tasks if self.group_kind == "task" else batch.labels
            self.matrix.observe(groups[groups >= 0])
        if self.on_learned is not None:
            self.on_learned(batch, seconds)
        if self._next_eval and self.learner.samples >= self._next_eval:
            self.evaluate()
            while self._next_eval <= self.learner.samples:
                self._next_eval += self.eval_every or 0

    def evaluate(self) -> None:
        """Score every group's probe now: one row of the accuracy matrix."""
        probe = self._probe_set()
        if probe is None or self._evaluated_at == self.learner.samples:
            return
        features, labels, groups = probe
        # Task-aware strategies (PackNet) are told each probe row's task: task-incremental.
        tasks = groups if self.learner.task_aware and self.group_kind == "task" else None
        started = time.perf_counter()
        self.final_probe = evaluate(
            lambda x: self.learner.predict(x, tasks),
            features,
            labels,
            groups,
            self.matrix.num_groups,
            self.learner.spec.num_classes,
        )
        summary = self.matrix.update(self.final_probe.per_group, self.learner.samples)
        self._evaluated_at = self.learner.samples
        self.evaluation_seconds += time.perf_counter() - started
        self.curve.append(
            {
                "samples_seen": self.learner.samples,
                "average_accuracy": summary.average_accuracy,
                "average_forgetting": summary.average_forgetting,
                "prequential_window": self.prequential.get_windowed(),
            }
        )
        if self.on_evaluated is not None:
            self.on_evaluated(self)
        log.info(
            "evaluated samples=%d average_accuracy=%.4f forgetting=%.4f",
            self.learner.samples,
            summary.average_accuracy,
            summary.average_forgetting,
        )

    def _probe_set(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(features, labels, groups) to evaluate on now, or None without any probe."""
        if self.heldout is not None:
            return self.heldout.features, self.heldout.labels, self.heldout.groups
        if self.probe is not None and len(self.probe):
            features, labels = self.probe.arrays()
            return features, labels, labels
        return None

    def report(self, corrupt_frames: int = 0) -> dict[str, Any]:
        """Metrics and the accounting of every message (timings are added by the caller)."""
        kind = self.group_kind if self.matrix.num_groups else "none"
        return {
            **metric_section(
                self.matrix, self.prequential, self.final_probe, kind, list(self.curve)
            ),
            "samples_seen": self.samples_seen,
            "samples_learned": self.samples_learned,
            "samples_rejected": self.samples_rejected,
            "samples_quarantined": self.in_quarantine,
            "samples_held_out": self.samples_held_out,
            "samples_pending": self.pending,
            **self.filtering.report(self.learner.quarantine, self.samples_seen),
            "accounting_holds": self.accounting_holds(),
            **head_tail(
                self.final_probe.per_class if self.final_probe else np.zeros(0),
                self.class_counts,
            ),
            # Damaged file regions are not messages: counted apart from the rejected ones.
            "corrupt_frames": corrupt_frames,
            "rejected_by_reason": dict(sorted(self.rejected.items())),
            "updates": self.learner.updates,
        }

    def state_dict(self) -> dict[str, Any]:
        """Counters, trackers and the pending partial batch (`session_state`)."""
        return session_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_session_state(self, state)


class FilterAccounting:
    """Counters of the noise filter's decisions and, given ground-truth noise flags
    `[stream length]` indexed by sample id, its precision and recall (never shown to
    the learner)."""

    KEYS = ("admitted", "quarantined", "readmitted", "rejected_noisy")

    def __init__(self, corrupted: np.ndarray | None):
        self.corrupted = corrupted
        self.counts = dict.fromkeys(self.KEYS, 0)
        self.corrupt = dict.fromkeys((*self.KEYS, "seen"), 0)

    def _flags(self, sample_ids: np.ndarray) -> np.ndarray:
        if self.corrupted is None:
            return np.zeros(len(sample_ids), dtype=bool)
        inside = (sample_ids >= 0) & (sample_ids < len(self.corrupted))
        flags = np.zeros(len(sample_ids), dtype=bool)
        flags[inside] = self.corrupted[sample_ids[inside]]
        return flags

    def update(self, batch: Batch, result: LearnResult) -> None:
        if self.corrupted is None:  # no noise flags: counts only, nothing corrupt
            admitted = int(result.admitted.sum())
            self.counts["admitted"] += admitted
            self.counts["quarantined"] += len(result.admitted) - admitted
            self.counts["readmitted"] += len(result.readmitted)
            self.counts["rejected_noisy"] += len(result.rejected)
            return
        flags = self._flags(batch.sample_ids)
        groups = {
            "seen": flags,
            "admitted": flags[result.admitted],
            "quarantined": flags[~result.admitted],
            "readmitted": self._flags(
                np.array([s.sample_id for s in result.readmitted], dtype=np.int64)
            ),
            "rejected_noisy": self._flags(
                np.array([h.sample.sample_id for h in result.rejected], dtype=np.int64)
            ),
        }
        for key, group in groups.items():
            if key != "seen":
                self.counts[key] += len(group)
            self.corrupt[key] += int(group.sum())

    def report(self, quarantine: Quarantine | None, seen: int) -> dict[str, Any]:
        """Counters, and precision/recall when the stream has noise flags."""
        out: dict[str, Any] = {
            "samples_admitted": self.counts["admitted"],
            "samples_quarantined_total": self.counts["quarantined"],
            "samples_readmitted": self.counts["readmitted"],
            "samples_rejected_noisy": self.counts["rejected_noisy"],
        }
        if self.corrupted is None:
            return out
        held = self._flags(quarantine.sample_ids()) if quarantine is not None else np.zeros(0, bool)
        kept_out = self.counts["rejected_noisy"] + len(held)
        kept_out_corrupt = self.corrupt["rejected_noisy"] + int(held.sum())
        corrupt_seen = self.corrupt["seen"]
        out["filter"] = {
            "corrupted_seen": corrupt_seen,
            "corrupted_learned": self.corrupt["admitted"] + self.corrupt["readmitted"],
            "rejected_precision": _ratio(
                self.corrupt["rejected_noisy"], self.counts["rejected_noisy"]
            ),
            "rejected_recall": _ratio(self.corrupt["rejected_noisy"], corrupt_seen),
            "quarantined_precision": _ratio(
                self.corrupt["quarantined"], self.counts["quarantined"]
            ),
            "quarantined_recall": _ratio(self.corrupt["quarantined"], corrupt_seen),
            "kept_out_precision": _ratio(kept_out_corrupt, kept_out),
            "kept_out_recall": _ratio(kept_out_corrupt, corrupt_seen),
        }
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "corrupt": dict(self.corrupt)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = {k: int(v) for k, v in state["counts"].items()}
        self.corrupt = {k: int(v) for k, v in state["corrupt"].items()}


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def without_timings(report: dict[str, Any]) -> dict[str, Any]:
    """The report minus the keys that vary between identical runs."""
    return {k: v for k, v in report.items() if k not in TIMING_KEYS}
