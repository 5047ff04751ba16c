"""Evaluate a predict callable on a labelled probe set, per group and per class."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ProbeResult:
    """per_group `[G]` and per_class `[C]` accuracies (NaN where a probe has no samples)."""

    per_group: np.ndarray
    per_class: np.ndarray
    overall: float


def evaluate(
    predict: Predict,
    features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    num_groups: int,
    num_classes: int,
) -> ProbeResult:
    """Predict the whole probe once, then score it by group and by class."""
    predicted = predict(features)
    correct = (predicted == labels).astype(np.float64)
    return ProbeResult(
        per_group=_mean_by(correct, groups, num_groups),
        per_class=_mean_by(correct, labels, num_classes),
        overall=float(correct.mean()) if len(correct) else float("nan"),
    )


def _mean_by(values: np.ndarray, keys: np.ndarray, n: int) -> np.ndarray:
    totals = np.bincount(keys, weights=values, minlength=n)
    counts = np.bincount(keys, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)
