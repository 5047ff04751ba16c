"""A stream's held-out evaluation set and its ground truth, kept beside the stream file.

The learner never reads this: it holds the clean test split grouped like the
training tasks, and for noisy streams which training labels were corrupted.
Stored as `.npz` and loaded with `allow_pickle=False`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from streamcl.ingest.errors import DataError

GroupKind = Literal["task", "class"]
SIDECAR_SUFFIX = ".eval.npz"


@dataclass(frozen=True)
class HeldOut:
    """features `[M, *shape]`, labels/groups `[M]`; train_* arrays are indexed by sample id."""

    features: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    group_kind: GroupKind
    train_clean_labels: np.ndarray
    train_corrupted: np.ndarray

    def __post_init__(self) -> None:
        if not len(self.features) == len(self.labels) == len(self.groups):
            raise DataError("held-out features, labels and groups differ in length")
        if len(self.train_clean_labels) != len(self.train_corrupted):
            raise DataError("train_clean_labels and train_corrupted differ in length")


def sidecar_path(stream_path: str | Path) -> Path:
    stream_path = Path(stream_path)
    return stream_path.with_name(stream_path.name + SIDECAR_SUFFIX)


def save(heldout: HeldOut, path: str | Path) -> None:
    """Write atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez_compressed(
        tmp,
        features=heldout.features,
        labels=heldout.labels,
        groups=heldout.groups,
        group_kind=np.array(heldout.group_kind),
        train_clean_labels=heldout.train_clean_labels,
        train_corrupted=heldout.train_corrupted,
    )
    os.replace(tmp, path)


def load(path: str | Path) -> HeldOut:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            kind = str(npz["group_kind"])
            if kind not in ("task", "class"):
                raise DataError(f"{path}: group_kind must be 'task' or 'class', got {kind!r}")
            return HeldOut(
                features=npz["features"],
                labels=npz["labels"].astype(np.int64),
                groups=npz["groups"].astype(np.int64),
                group_kind=kind,  # type: ignore[arg-type]
                train_clean_labels=npz["train_clean_labels"].astype(np.int64),
                train_corrupted=npz["train_corrupted"].astype(bool),
            )
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"cannot read held-out set {path}: {err}") from err
