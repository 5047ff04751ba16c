"""Turn an external arrival order (NumPy arrays) into a recorded stream, checked row by row.

`stream import` reads a `.npz` with `allow_pickle=False`; the Avalanche bridge hands its
arrays to `from_arrays` too, so both sources meet the same checks. Every problem names
the array and, for bad values, the first bad index: a user fixes the file, not the code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from streamcl.ingest import heldout as heldout_io
from streamcl.ingest.codec import _MAX_TASK
from streamcl.ingest.errors import ConfigError, DataError
from streamcl.ingest.heldout import HeldOut
from streamcl.ingest.scenarios import BuiltStream, write_frames
from streamcl.ingest.schema import NO_TASK, StreamSpec

REQUIRED = ("features", "labels")
OPTIONAL = (
    "tasks",
    "noisy",
    "clean_labels",
    "eval_features",
    "eval_labels",
    "eval_tasks",
    "experiences",  # written by `stream export`; checked, not needed to rebuild the stream
)
KNOWN = REQUIRED + OPTIONAL


def from_npz(path: str | Path, num_classes: int | None = None) -> BuiltStream:
    """Load and check an `.npz` of arrays (see `from_arrays`); pickled objects are refused."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            unknown = sorted(set(npz.files) - set(KNOWN))
            if unknown:
                raise DataError(
                    f"{path}: unknown array(s) {', '.join(unknown)}; expected {', '.join(KNOWN)}"
                )
            arrays = {}
            for name in npz.files:
                try:
                    arrays[name] = npz[name]
                except ValueError as err:  # object arrays need pickle: refused
                    raise DataError(f"{path}: array {name!r} cannot be read: {err}") from err
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path} as an .npz file: {err}") from err
    return from_arrays(arrays, num_classes=num_classes, source=str(path))


def from_arrays(
    arrays: Mapping[str, np.ndarray],
    num_classes: int | None = None,
    source: str = "arrays",
    meta: Mapping[str, Any] | None = None,
) -> BuiltStream:
    """Check the arrays and build a stream in their order.

    features `[N, ...]` (uint8 kept, other numbers become float32), labels `[N]`; optional
    tasks `[N]`, noisy `[N]` (ground-truth flags for reports, never shown to the learner),
    clean_labels `[N]`, and a held-out set eval_features/eval_labels (+ eval_tasks to
    group it by task, else it is grouped by class). `num_classes` declares the label
    range; without it the range is 0..max label.
    """
    missing = [name for name in REQUIRED if name not in arrays]
    if missing:
        raise DataError(f"{source}: missing array(s) {', '.join(missing)}")
    features = _features(arrays["features"], "features", source)
    n = len(features)
    labels = _integers(arrays["labels"], "labels", n, source)
    has_eval = "eval_features" in arrays or "eval_labels" in arrays
    if has_eval and not {"eval_features", "eval_labels"} <= set(arrays):
        absent = "eval_labels" if "eval_features" in arrays else "eval_features"
        raise DataError(f"{source}: eval_features and eval_labels go together; {absent} missing")
    if "eval_tasks" in arrays and not has_eval:
        raise DataError(f"{source}: eval_tasks given without eval_features/eval_labels")
    eval_labels = np.zeros(0, np.int64)
    if has_eval:
        eval_features = _features(arrays["eval_features"], "eval_features", source)
        if eval_features.shape[1:] != features.shape[1:]:
            raise DataError(
                f"{source}: eval_features samples have shape {eval_features.shape[1:]}, "
                f"features {features.shape[1:]}"
            )
        eval_labels = _integers(arrays["eval_labels"], "eval_labels", len(eval_features), source)
    declared = num_classes if num_classes is not None else _label_count(labels, eval_labels)
    _check_range(labels, "labels", 0, declared - 1, source)
    _check_range(eval_labels, "eval_labels", 0, declared - 1, source)
    tasks = np.full(n, NO_TASK, np.int64)
    if "tasks" in arrays:
        tasks = _integers(arrays["tasks"], "tasks", n, source)
        _check_range(tasks, "tasks", 0, _MAX_TASK, source)
    if "experiences" in arrays:
        _integers(arrays["experiences"], "experiences", n, source)
    noisy = np.zeros(n, bool)
    if "noisy" in arrays:
        noisy = _flags(arrays["noisy"], "noisy", n, source)
    clean = labels.copy()
    if "clean_labels" in arrays:
        clean = _integers(arrays["clean_labels"], "clean_labels", n, source)
        _check_range(clean, "clean_labels", 0, declared - 1, source)
    if ("noisy" in arrays or "clean_labels" in arrays) and not has_eval:
        raise DataError(
            f"{source}: noisy/clean_labels travel in the held-out file: give eval_features "
            "and eval_labels too"
        )
    try:
        spec = StreamSpec(tuple(int(d) for d in features.shape[1:]), _dtype(features), declared)
    except ConfigError as err:  # e.g. more than 4 sample dims, a single class
        raise DataError(f"{source}: {err}") from err
    if has_eval:
        if "eval_tasks" in arrays:
            groups = _integers(arrays["eval_tasks"], "eval_tasks", len(eval_labels), source)
            _check_range(groups, "eval_tasks", 0, _MAX_TASK, source)
            kind = "task"
        else:
            groups, kind = eval_labels, "class"
        heldout = HeldOut(eval_features, eval_labels, groups, kind, clean, noisy)  # type: ignore[arg-type]
    else:
        empty = np.zeros((0, *features.shape[1:]), features.dtype)
        heldout = HeldOut(empty, eval_labels, eval_labels, "class", clean, noisy)
    info = {
        "dataset": source,
        "scenario": "imported",
        "num_messages": n,
        **({"tasks": len(np.unique(tasks))} if "tasks" in arrays else {}),
        "noise": float(noisy.mean()),
        **(meta or {}),
    }
    return BuiltStream(spec, features, labels, tasks, heldout, info)


def _features(raw: np.ndarray, name: str, source: str) -> np.ndarray:
    if raw.ndim < 2:
        raise DataError(f"{source}: {name} must be [N, ...] with a sample shape, got {raw.shape}")
    if len(raw) == 0:
        raise DataError(f"{source}: {name} holds no samples")
    if raw.dtype == np.uint8:
        return np.ascontiguousarray(raw)
    if raw.dtype.kind not in "biuf":
        raise DataError(f"{source}: {name} must hold numbers, got dtype {raw.dtype}")
    values = raw.astype(np.float32)
    finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if not finite.all():
        index = int(np.flatnonzero(~finite)[0])
        raise DataError(
            f"{source}: {name}[{index}] is not finite ({int((~finite).sum())} such rows"
            f"{'' if values.dtype == raw.dtype else ', after conversion to float32'})"
        )
    return np.ascontiguousarray(values)


def _integers(raw: np.ndarray, name: str, length: int, source: str) -> np.ndarray:
    _check_length(raw, name, length, source)
    if raw.dtype.kind in "iub":
        return raw.astype(np.int64)
    if raw.dtype.kind != "f":
        raise DataError(f"{source}: {name} must hold integers, got dtype {raw.dtype}")
    whole = np.isfinite(raw) & (raw == np.round(raw))
    if not whole.all():
        index = int(np.flatnonzero(~whole)[0])
        raise DataError(f"{source}: {name}[{index}] = {raw[index]} is not an integer")
    return raw.astype(np.int64)


def _flags(raw: np.ndarray, name: str, length: int, source: str) -> np.ndarray:
    values = _integers(raw, name, length, source)
    bad = (values != 0) & (values != 1)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise DataError(f"{source}: {name}[{index}] = {values[index]} is not a 0/1 flag")
    return values.astype(bool)


def _check_length(raw: np.ndarray, name: str, length: int, source: str) -> None:
    if raw.ndim != 1:
        raise DataError(f"{source}: {name} must be one-dimensional, got shape {raw.shape}")
    if len(raw) != length:
        base = "eval_features" if name.startswith("eval_") else "features"
        raise DataError(f"{source}: {name} has {len(raw)} rows, {base} has {length}")


def _check_range(values: np.ndarray, name: str, low: int, high: int, source: str) -> None:
    bad = (values < low) | (values > high)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{source}: {name}[{index}] = {values[index]} is outside [{low}, {high}]"
            f"{' (the declared classes)' if 'labels' in name else ''}"
        )


def _label_count(labels: np.ndarray, eval_labels: np.ndarray) -> int:
    top = max(int(labels.max()), int(eval_labels.max()) if len(eval_labels) else 0)
    return max(top + 1, 2)


def _dtype(features: np.ndarray) -> Any:
    return "uint8" if features.dtype == np.uint8 else "float32"


def write(stream: BuiltStream, path: str | Path) -> Path | None:
    """Write the stream file, and its held-out sidecar when it has one; returns the sidecar."""
    write_frames(stream, path)
    sidecar = heldout_io.sidecar_path(path)
    if not len(stream.heldout.labels):
        sidecar.unlink(missing_ok=True)  # a stale one from an earlier import would mislead
        return None
    heldout_io.save(stream.heldout, sidecar)
    return sidecar
