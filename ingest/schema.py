"""The shapes every layer shares: `StreamSpec`, `Sample`, `Batch`, `Rejected`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal, NamedTuple

import numpy as np

from streamcl.ingest.errors import ConfigError

FeatureDtype = Literal["uint8", "float32"]
NO_TASK = -1
"""Task id of a sample that carries none (task-free streams)."""


def image_shape(shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """`[C, H, W]` of features shaped `[H*W]` (square), `[H, W]` or `[C, H, W]`; else None."""
    if len(shape) == 1:
        side = math.isqrt(shape[0])
        return (1, side, side) if side >= 4 and side * side == shape[0] else None
    if len(shape) == 2:
        return (1, *shape) if min(shape) >= 4 else None
    if len(shape) == 3:
        return (shape[0], shape[1], shape[2]) if min(shape[1:]) >= 4 else None
    return None


@dataclass(frozen=True)
class StreamSpec:
    """What a valid sample of a stream looks like.

    The learner and the validator agree on this contract; it travels in a recorded
    stream's header and in the service configuration.
    """

    feature_shape: tuple[int, ...]
    dtype: FeatureDtype
    num_classes: int

    def __post_init__(self) -> None:
        if not self.feature_shape or any(d <= 0 for d in self.feature_shape):
            raise ConfigError(f"feature_shape must be positive dims, got {self.feature_shape}")
        if len(self.feature_shape) > 4:
            raise ConfigError(f"feature_shape has at most 4 dims, got {self.feature_shape}")
        if self.dtype not in ("uint8", "float32"):
            raise ConfigError(f"dtype must be 'uint8' or 'float32', got {self.dtype!r}")
        if self.num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {self.num_classes}")

    @cached_property
    def feature_size(self) -> int:
        return int(np.prod(self.feature_shape))

    @cached_property
    def feature_nbytes(self) -> int:
        return self.feature_size * np.dtype(self.dtype).itemsize

    def to_dict(self) -> dict[str, object]:
        return {
            "feature_shape": list(self.feature_shape),
            "dtype": self.dtype,
            "num_classes": self.num_classes,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> StreamSpec:
        try:
            shape = tuple(int(d) for d in raw["feature_shape"])  # type: ignore[attr-defined]
            return cls(shape, raw["dtype"], int(raw["num_classes"]))  # type: ignore[arg-type,call-overload]
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(
                f"stream spec needs feature_shape, dtype, num_classes: {raw!r}"[:200]
            ) from err


class Origin(NamedTuple):
    """Where a message came from: a Kafka coordinate or a recorded-stream offset.

    A NamedTuple, not a dataclass: one is built per message on the hot path.
    """

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class Sample:
    """One labelled sample as it arrived."""

    features: np.ndarray
    label: int
    task: int = NO_TASK
    sample_id: int = 0
    event_time_ms: int = 0
    origin: Origin | None = None


@dataclass(frozen=True)
class Rejected:
    """A message that failed decoding or validation, kept whole for the dead-letter sink.

    last_offset: set when the rejection covers the offsets `origin.offset..last_offset`
    of one partition (a record batch the Kafka client could not decode; payload empty).
    """

    payload: bytes
    reason: str
    detail: str
    origin: Origin | None = None
    last_offset: int | None = None

    @property
    def count(self) -> int:
        """Messages (offsets) this rejection accounts for."""
        if self.last_offset is None or self.origin is None:
            return 1
        return self.last_offset - self.origin.offset + 1


@dataclass(frozen=True)
class Batch:
    """Valid samples stacked for one update.

    features: `[B, *feature_shape]` in the stream dtype; labels, tasks, sample_ids,
    event_times_ms: `[B]` int64. Stages treat the arrays as read-only (contract-tested).
    """

    features: np.ndarray
    labels: np.ndarray
    tasks: np.ndarray
    sample_ids: np.ndarray
    event_times_ms: np.ndarray
    origins: tuple[Origin | None, ...] = field(default=())

    def __post_init__(self) -> None:
        n = len(self.labels)
        for name in ("features", "tasks", "sample_ids", "event_times_ms"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Batch.{name} has {len(getattr(self, name))} rows, labels {n}")

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, start: int, stop: int) -> Batch:
        """Rows `start:stop` (views, no copy)."""
        if start == 0 and stop == len(self):
            return self
        return Batch(
            self.features[start:stop],
            self.labels[start:stop],
            self.tasks[start:stop],
            self.sample_ids[start:stop],
            self.event_times_ms[start:stop],
            self.origins[start:stop],
        )

    @classmethod
    def from_arrays(
        cls, features: np.ndarray, labels: np.ndarray, tasks: np.ndarray | None = None
    ) -> Batch:
        """A batch of arrays alone, for callers without a stream (an embedded learner):
        features `[B, *shape]`, labels `[B]`, tasks `[B]` or None (no task ids); sample ids
        are the row numbers and event times 0."""
        n = len(labels)
        return cls(
            features=np.asarray(features),
            labels=np.asarray(labels, dtype=np.int64),
            tasks=np.full(n, NO_TASK, np.int64) if tasks is None else np.asarray(tasks, np.int64),
            sample_ids=np.arange(n, dtype=np.int64),
            event_times_ms=np.zeros(n, dtype=np.int64),
        )

    @classmethod
    def from_samples(cls, samples: list[Sample]) -> Batch:
        if not samples:
            raise ValueError("a Batch needs at least one sample")
        return cls(
            features=np.stack([s.features for s in samples]),
            labels=np.fromiter((s.label for s in samples), np.int64, len(samples)),
            tasks=np.fromiter((s.task for s in samples), np.int64, len(samples)),
            sample_ids=np.fromiter((s.sample_id for s in samples), np.int64, len(samples)),
            event_times_ms=np.fromiter((s.event_time_ms for s in samples), np.int64, len(samples)),
            origins=tuple(s.origin for s in samples),
        )
