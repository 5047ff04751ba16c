"""Task-boundary detection for task-free streams: drift in the error signal, unseen classes.

The change test itself is river's (`PageHinkley` in its one-sided "up" mode, restated
below with the same arithmetic, or `ADWIN`); this module decides what to feed it and
which of its alarms are boundaries:

- the signal is per sample, test-then-train: 0/1 error of the prediction made before the
  update (`signal="error"`), or its cross-entropy (`signal="loss"`);
- only *increases* count: learning a task lowers the error, a new task raises it. ADWIN
  alarms on any change, so one counts when the window's mean went up;
- a label never seen before is a boundary too (class-incremental streams);
- Page-Hinkley compares each value with the mean since its last reset. While a task is
  learned the error falls and that mean lags above it; with river's default fading
  (alpha < 1) the cumulative sum then relaxes upwards over ~1/(1-alpha) samples and
  alarms tens of thousands of samples into a task. No fading (alpha = 1) and a larger
  tolerated change (delta = 0.02) keep it quiet within a task and still alarm ~100
  samples after a jump in the error rate (measured on permuted Fashion-MNIST);
- alarms within `min_gap` samples of the previous event (or the stream start) merge into
  it: one change raises both alarms, and a new task's classes arrive over a few samples.

State is bounded, whatever the stream's length, and saved as tensors and plain values
that `torch.load(weights_only=True)` restores exactly, alarm for alarm: Page-Hinkley is
river's up-mode test re-stated here (`PageHinkleyUp`, the same arithmetic) so that its
five running values are ours to save; ADWIN's compiled window is saved as the bytes of
river's own `__getstate__` (its buckets: logarithmic in the window's width). Events are
counted by reason and only the latest `RECENT_EVENTS` are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from river import drift

from streamcl.ingest.errors import ConfigError
from streamcl.learner.history import EventLog

DetectorKind = Literal["page-hinkley", "adwin"]
Signal = Literal["error", "loss"]
EventReason = Literal["drift", "new-class"]


@dataclass(frozen=True)
class DriftEvent:
    """A detected boundary: `sample` is the 0-based index of the learned sample it fired on."""

    sample: int
    reason: EventReason


class BoundaryDetector:
    """Detect task boundaries in a stream of per-sample errors and labels; `update` feeds it."""

    def __init__(
        self,
        num_classes: int,
        kind: DetectorKind = "page-hinkley",
        signal: Signal = "error",
        new_classes: bool = True,
        min_gap: int = 500,
        threshold: float = 50.0,
        delta: float = 0.02,
        min_instances: int = 30,
        alpha: float = 1.0,
        confidence: float = 0.002,
    ):
        if kind not in ("page-hinkley", "adwin"):
            raise ConfigError(f"detector kind must be page-hinkley or adwin, got {kind!r}")
        if signal not in ("error", "loss"):
            raise ConfigError(f"detector signal must be error or loss, got {signal!r}")
        if num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        if min_gap < 0:
            raise ConfigError(f"min_gap must be >= 0 samples, got {min_gap}")
        if threshold <= 0 or delta < 0 or min_instances < 1 or not 0 < alpha <= 1:
            raise ConfigError(
                "page-hinkley needs threshold > 0, delta >= 0, min_instances >= 1 and "
                f"0 < alpha <= 1, got {threshold}, {delta}, {min_instances}, {alpha}"
            )
        if not 0 < confidence < 1:
            raise ConfigError(f"adwin confidence must be in (0, 1), got {confidence}")
        self.num_classes = num_classes
        self.kind = kind
        self.signal = signal
        self.new_classes = new_classes
        self.min_gap = min_gap
        self.threshold = threshold
        self.delta = delta
        self.min_instances = min_instances
        self.alpha = alpha
        self.confidence = confidence
        self.log: EventLog[DriftEvent] = EventLog()
        self._seen = np.zeros(num_classes, dtype=bool)
        self._last_event = 0
        self._detector = self._fresh()

    @property
    def events(self) -> list[DriftEvent]:
        """The latest events, oldest first (`event_count` counts every one)."""
        return list(self.log)

    @property
    def event_count(self) -> int:
        return self.log.total

    def update(self, values: np.ndarray, labels: np.ndarray, first: int) -> list[DriftEvent]:
        """Feed per-sample signal values and labels `[B]`; returns the events they raise.

        `first` is the stream index of the first sample (indices are contiguous).
        """
        raised = []
        for offset, (value, label) in enumerate(zip(values.tolist(), labels.tolist(), strict=True)):
            index = first + offset
            reason: EventReason | None = None
            if self.new_classes and 0 <= label < self.num_classes and not self._seen[label]:
                self._seen[label] = True
                reason = "new-class"
            if self._feed(value) and reason is None:
                reason = "drift"
            if reason is not None and index - self._last_event >= self.min_gap:
                event = DriftEvent(index, reason)
                raised.append(event)
                self.log.append(event)
                self._last_event = index
                self._detector = self._fresh()
        return raised

    def _fresh(self) -> Any:
        if self.kind == "page-hinkley":
            return PageHinkleyUp(self.min_instances, self.delta, self.threshold, self.alpha)
        return drift.ADWIN(delta=self.confidence)

    def _feed(self, value: float) -> bool:
        """Feed one value; True when the detector alarms on an increase."""
        # Rounded to float32 (state used to be saved as float32 values): same alarms as ever.
        value = float(np.float32(value))
        before = self._detector.estimation if self.kind == "adwin" else 0.0
        self._detector.update(value)
        if not self._detector.drift_detected:
            return False
        return self.kind == "page-hinkley" or self._detector.estimation > before

    def state_dict(self) -> dict[str, Any]:
        """A fixed-size state: class flags, detector state, event counts, latest events."""
        if isinstance(self._detector, PageHinkleyUp):
            detector: dict[str, Any] = self._detector.state_dict()
        else:
            window = np.frombuffer(self._detector._helper.__getstate__(), dtype=np.uint8)
            detector = {
                "window": torch.from_numpy(window.copy()),
                # river resets the window at the update after any alarm.
                "alarmed": bool(self._detector.drift_detected),
            }
        return {
            "seen": torch.from_numpy(self._seen.copy()),
            "last_event": self._last_event,
            "detector": detector,
            "events": self.log.state_dict(),
            "event_samples": torch.tensor([e.sample for e in self.log], dtype=torch.int64),
            "event_reasons": [e.reason for e in self.log],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._seen = state["seen"].numpy().astype(bool)
        self._last_event = int(state["last_event"])
        recent = [
            DriftEvent(int(sample), reason)
            for sample, reason in zip(
                state["event_samples"].tolist(), state["event_reasons"], strict=True
            )
        ]
        self.log.load_state_dict(state["events"], recent)
        self._detector = self._fresh()
        detector = state["detector"]
        if isinstance(self._detector, PageHinkleyUp):
            self._detector.load_state_dict(detector)
        else:
            self._detector._helper.__setstate__(detector["window"].numpy().tobytes())
            self._detector._drift_detected = bool(detector["alarmed"])


class PageHinkleyUp:
    """river's `drift.PageHinkley(mode="up")`, the same arithmetic, with its state in plain
    floats: river keeps it in private attributes, and checkpoints need it.

    Alarms when the cumulative deviation of the values above their running mean (less
    `delta` per value, faded by `alpha`) rises `threshold` above its minimum; the test
    starts afresh at the update after an alarm, as river's does.
    """

    def __init__(self, min_instances: int, delta: float, threshold: float, alpha: float):
        self.min_instances = min_instances
        self.delta = delta
        self.threshold = threshold
        self.alpha = alpha
        self._reset()

    def _reset(self) -> None:
        self.n = 0.0
        self.mean = 0.0
        self.sum = 0.0
        self.min = float("inf")
        self.drift_detected = False

    def update(self, x: float) -> None:
        if self.drift_detected:
            self._reset()
        self.n += 1.0
        self.mean += (1.0 / self.n) * (x - self.mean)
        self.sum = self.alpha * self.sum + (x - self.mean) - self.delta
        if self.sum < self.min:
            self.min = self.sum
        if self.n >= self.min_instances:
            self.drift_detected = self.sum - self.min > self.threshold

    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "mean": self.mean,
            "sum": self.sum,
            "min": self.min,
            "alarmed": self.drift_detected,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n, self.mean = float(state["n"]), float(state["mean"])
        self.sum, self.min = float(state["sum"]), float(state["min"])
        self.drift_detected = bool(state["alarmed"])
