"""Turn a labelled dataset into a continual-learning stream, deterministically by seed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from streamcl.ingest import heldout as heldout_io
from streamcl.ingest.codec import encode
from streamcl.ingest.datasets import LabelledData
from streamcl.ingest.errors import ConfigError
from streamcl.ingest.heldout import HeldOut
from streamcl.ingest.recorded import StreamWriter
from streamcl.ingest.schema import Sample, StreamSpec

ScenarioName = Literal["class-incremental", "permuted"]
NoiseType = Literal["symmetric", "pairflip"]
EVENT_TIME_BASE_MS = 1_700_000_000_000
"""Event times of built streams: a fixed epoch plus one millisecond per sample."""


@dataclass(frozen=True)
class ScenarioConfig:
    scenario: ScenarioName = "class-incremental"
    tasks: int = 5
    noise: float = 0.0
    noise_type: NoiseType = "symmetric"
    imbalance: float = 1.0
    samples_per_task: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scenario not in ("class-incremental", "permuted"):
            raise ConfigError(f"scenario must be class-incremental or permuted: {self.scenario!r}")
        if self.tasks < 1:
            raise ConfigError(f"tasks must be >= 1, got {self.tasks}")
        if not 0.0 <= self.noise < 1.0:
            raise ConfigError(f"noise must be in [0, 1), got {self.noise}")
        if self.noise_type not in ("symmetric", "pairflip"):
            raise ConfigError(f"noise_type must be symmetric or pairflip: {self.noise_type!r}")
        if self.imbalance < 1.0:
            raise ConfigError(f"imbalance (max/min class count) must be >= 1: {self.imbalance}")
        if self.samples_per_task is not None and self.samples_per_task < 1:
            raise ConfigError(f"samples_per_task must be >= 1, got {self.samples_per_task}")


@dataclass(frozen=True)
class BuiltStream:
    """Training arrays in arrival order plus the held-out set; labels may be noisy."""

    spec: StreamSpec
    features: np.ndarray
    labels: np.ndarray
    tasks: np.ndarray
    heldout: HeldOut
    meta: dict[str, Any] = field(default_factory=dict)


def build(data: LabelledData, config: ScenarioConfig) -> BuiltStream:
    """Build the stream: imbalance, then task split and order, then label noise."""
    rng = np.random.default_rng(config.seed)
    num_classes = data.num_classes
    keep = long_tail_indices(data.train_y, num_classes, config.imbalance, rng)
    x, y = data.train_x[keep], data.train_y[keep]
    if config.scenario == "class-incremental":
        x, y, tasks, hx, hy, hg, meta = _class_incremental(data, x, y, config, rng)
    else:
        x, y, tasks, hx, hy, hg, meta = _permuted(data, x, y, config, rng)
    noisy, corrupted = corrupt_labels(y, num_classes, config.noise, config.noise_type, rng)
    spec = StreamSpec(tuple(int(d) for d in x.shape[1:]), "uint8", num_classes)
    heldout = HeldOut(hx, hy, hg, "task", train_clean_labels=y, train_corrupted=corrupted)
    meta.update(
        dataset=data.name,
        scenario=config.scenario,
        tasks=config.tasks,
        noise=config.noise,
        noise_type=config.noise_type,
        imbalance=config.imbalance,
        seed=config.seed,
        num_messages=len(noisy),
    )
    return BuiltStream(spec, x, noisy, tasks, heldout, meta)


def write(stream: BuiltStream, path: str | Path) -> Path:
    """Write the stream file and its held-out sidecar; returns the sidecar path."""
    write_frames(stream, path)
    sidecar = heldout_io.sidecar_path(path)
    heldout_io.save(stream.heldout, sidecar)
    return sidecar


def write_frames(stream: BuiltStream, path: str | Path) -> None:
    """Write the stream file alone, one message per sample in array order."""
    with StreamWriter(path, stream.spec, stream.meta) as writer:
        for i in range(len(stream.labels)):
            event_time = EVENT_TIME_BASE_MS + i
            sample = Sample(
                stream.features[i], int(stream.labels[i]), int(stream.tasks[i]), i, event_time
            )
            writer.write(encode(sample), offset=i, timestamp_ms=event_time)


def long_tail_indices(
    labels: np.ndarray, num_classes: int, ratio: float, rng: np.random.Generator
) -> np.ndarray:
    """Keep n_max * ratio^(-rank/(C-1)) samples of the class of rank `rank` (seeded ranks)."""
    if ratio == 1.0:
        return np.arange(len(labels))
    ranks = rng.permutation(num_classes)
    n_max = min(np.sum(labels == c) for c in range(num_classes))
    kept = []
    for c in range(num_classes):
        n_keep = max(1, int(n_max * ratio ** (-ranks[c] / (num_classes - 1))))
        kept.append(rng.permutation(np.flatnonzero(labels == c))[:n_keep])
    return np.sort(np.concatenate(kept))


def corrupt_labels(
    labels: np.ndarray, num_classes: int, rate: float, kind: NoiseType, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Return (noisy labels, corrupted flags); a corrupted label always differs from the truth.

    symmetric: a uniformly random other class; pairflip: class c becomes (c + 1) mod C.
    """
    corrupted = rng.random(len(labels)) < rate
    noisy = labels.copy()
    if kind == "symmetric":
        shift = rng.integers(1, num_classes, size=len(labels))
    else:
        shift = np.ones(len(labels), dtype=np.int64)
    noisy[corrupted] = (labels[corrupted] + shift[corrupted]) % num_classes
    return noisy, corrupted


def _class_incremental(data, x, y, config, rng):  # type: ignore[no-untyped-def]
    if data.num_classes % config.tasks:
        raise ConfigError(
            f"class-incremental needs classes divisible by tasks: {data.num_classes} classes, "
            f"{config.tasks} tasks"
        )
    per_task = data.num_classes // config.tasks
    order = rng.permutation(data.num_classes)
    task_of_class = np.empty(data.num_classes, dtype=np.int64)
    for t in range(config.tasks):
        task_of_class[order[t * per_task : (t + 1) * per_task]] = t
    parts = []
    for t in range(config.tasks):
        idx = rng.permutation(np.flatnonzero(task_of_class[y] == t))
        parts.append(idx[: config.samples_per_task])
    idx = np.concatenate(parts)
    task_classes = [
        sorted(int(c) for c in order[t * per_task : (t + 1) * per_task])
        for t in range(config.tasks)
    ]
    meta = {"task_classes": task_classes}
    hg = task_of_class[data.test_y]
    return x[idx], y[idx], task_of_class[y[idx]], data.test_x, data.test_y, hg, meta


def _permuted(data, x, y, config, rng):  # type: ignore[no-untyped-def]
    size = int(np.prod(x.shape[1:]))
    perms = [np.arange(size)] + [rng.permutation(size) for _ in range(config.tasks - 1)]
    xs, ys, ts, hxs, hys, hgs = [], [], [], [], [], []
    flat, test_flat = x.reshape(len(x), size), data.test_x.reshape(len(data.test_x), size)
    for t, perm in enumerate(perms):
        idx = rng.permutation(len(y))[: config.samples_per_task]
        xs.append(flat[idx][:, perm].reshape((-1, *x.shape[1:])))
        ys.append(y[idx])
        ts.append(np.full(len(idx), t, dtype=np.int64))
        hxs.append(test_flat[:, perm].reshape(data.test_x.shape))
        hys.append(data.test_y)
        hgs.append(np.full(len(data.test_y), t, dtype=np.int64))
    meta = {"permutation_seed": config.seed}
    return (
        np.concatenate(xs),
        np.concatenate(ys),
        np.concatenate(ts),
        np.concatenate(hxs),
        np.concatenate(hys),
        np.concatenate(hgs),
        meta,
    )
