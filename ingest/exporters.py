"""Write a recorded stream back out as arrays: the `.npz` that `stream import` reads.

Beside the arrays that import accepts, the file holds `experiences` `[N]`: the
experience each sample belongs to when the stream is cut the Avalanche way (one per
run of a task id, or per fixed-size window on a stream without task ids). Messages
that fail validation and damaged frames are not exported; they are counted and
returned, never dropped silently.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamcl.ingest import heldout as heldout_io
from streamcl.ingest.codec import decode
from streamcl.ingest.errors import ConfigError, DataError
from streamcl.ingest.recorded import CorruptFrame, StreamReader
from streamcl.ingest.schema import NO_TASK, Rejected


@dataclass
class Exported:
    """What an export wrote and what it left out, by reason."""

    samples: int
    experiences: int
    skipped: Counter[str] = field(default_factory=Counter)
    heldout: bool = False


def experience_ids(tasks: np.ndarray, window: int | None) -> np.ndarray:
    """One experience per run of equal task ids; per `window` samples where a sample has none."""
    if (tasks == NO_TASK).any():
        if window is None:
            raise ConfigError("the stream has samples without task ids: give a window size")
        return np.arange(len(tasks), dtype=np.int64) // window
    if window is not None:
        return np.arange(len(tasks), dtype=np.int64) // window
    change = np.concatenate([[False], tasks[1:] != tasks[:-1]])
    return np.cumsum(change).astype(np.int64)


def export_npz(
    stream: str | Path,
    out: str | Path,
    heldout: str | Path | None = None,
    window: int | None = None,
) -> Exported:
    """Decode every valid message of `stream` in order and save the arrays to `out`."""
    if window is not None and window < 1:
        raise ConfigError(f"window must be >= 1, got {window}")
    skipped: Counter[str] = Counter()
    features, labels, tasks, ids = [], [], [], []
    with StreamReader(stream) as reader:
        spec = reader.spec
        for frame in reader:
            if isinstance(frame, CorruptFrame):
                skipped["corrupt_frame"] += 1
                continue
            sample = decode(frame.payload, spec)
            if isinstance(sample, Rejected):
                skipped[sample.reason] += 1
                continue
            features.append(sample.features)
            labels.append(sample.label)
            tasks.append(sample.task)
            ids.append(sample.sample_id)
    if not labels:
        raise DataError(f"{stream}: no valid sample to export ({dict(skipped)} skipped)")
    task_array = np.array(tasks, np.int64)
    experiences = experience_ids(task_array, window)
    arrays = {
        "features": np.stack(features),
        "labels": np.array(labels, np.int64),
        "experiences": experiences,
    }
    if (task_array != NO_TASK).all():
        arrays["tasks"] = task_array
    path = Path(heldout) if heldout else heldout_io.sidecar_path(stream)
    has_heldout = heldout is not None or path.exists()
    if has_heldout:
        held = heldout_io.load(path)
        arrays.update(eval_features=held.features, eval_labels=held.labels)
        if held.group_kind == "task":
            arrays["eval_tasks"] = held.groups
        arrays.update(_ground_truth(held, np.array(ids, np.int64)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.npz")
    np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, out)
    return Exported(len(labels), int(experiences.max()) + 1, skipped, has_heldout)


def _ground_truth(held: heldout_io.HeldOut, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Noise flags and clean labels by sample id, when the held-out file covers every id."""
    known = len(held.train_corrupted)
    if not known or ids.min() < 0 or ids.max() >= known:
        return {}
    return {"noisy": held.train_corrupted[ids], "clean_labels": held.train_clean_labels[ids]}
