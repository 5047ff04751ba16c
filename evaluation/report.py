"""Turn trackers into the JSON report's metric section, and draw its plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from streamcl.evaluation.probes import ProbeResult
from streamcl.evaluation.tracker import AccuracyMatrix, PrequentialAccuracy
from streamcl.ingest.errors import ConfigError
from streamcl.ingest.schema import image_shape

GRID_SCALE = 3
"""Pixels per exemplar pixel in the condensed-exemplar grid."""
GRID_GAP = 2
"""Background pixels between the grid's cells."""


def metric_section(
    matrix: AccuracyMatrix,
    prequential: PrequentialAccuracy,
    final_probe: ProbeResult | None,
    group_kind: str,
    curve: list[dict[str, float]],
) -> dict[str, Any]:
    """The continual-learning metrics of a run, JSON-ready.

    A metric that is undefined (NaN: a group trained on has no probe sample) is null,
    and `null_reasons` says why, keyed by the metric's name.
    """
    summary = matrix.get()
    scalars = {
        "final_average_accuracy": summary.average_accuracy,
        "average_forgetting": summary.average_forgetting,
        "backward_transfer": summary.backward_transfer,
    }
    why = _undefined_because(matrix, group_kind)
    return {
        **{key: None if math.isnan(value) else value for key, value in scalars.items()},
        "null_reasons": {key: why for key, value in scalars.items() if math.isnan(value)},
        "group_kind": group_kind,
        "accuracy_matrix": _jsonable(matrix.matrix),
        "evaluation_points": list(matrix.points),
        "per_group_forgetting": _jsonable(matrix.group_forgetting()),
        "per_class_accuracy": _jsonable(final_probe.per_class) if final_probe else [],
        "prequential_accuracy": prequential.get(),
        "accuracy_curve": curve,
    }


def _undefined_because(matrix: AccuracyMatrix, group_kind: str) -> str:
    """Why a summary of `matrix` is NaN: the groups trained on that have no probe sample."""
    if not matrix.rows:
        return "no evaluation point yet"
    names = ", ".join(str(g) for g in matrix.undefined_groups())
    return (
        f"{group_kind} {names} trained on but without a probe sample at some evaluation "
        f"point: its accuracy there is undefined"
    )


def head_tail(per_class: np.ndarray, class_counts: np.ndarray) -> dict[str, Any]:
    """Mean accuracy of the most and least frequent half of the classes that arrived.

    per_class: `[C]` held-out accuracy (NaN where no probe); class_counts: `[C]` arrivals
    per label. Ties in frequency break by class id, so the split is deterministic.
    """
    seen = np.flatnonzero(class_counts > 0)
    order = seen[np.lexsort((seen, -class_counts[seen]))]
    half = (len(order) + 1) // 2
    head, tail = order[:half], order[half:]

    def mean(classes: np.ndarray) -> float | None:
        values = per_class[classes] if len(per_class) else np.zeros(0)
        values = values[~np.isnan(values)]
        return float(values.mean()) if len(values) else None

    return {
        "class_counts": class_counts.tolist(),
        "head_classes": sorted(int(c) for c in head),
        "tail_classes": sorted(int(c) for c in tail),
        "head_accuracy": mean(head),
        "tail_accuracy": mean(tail),
    }


def _jsonable(values: np.ndarray) -> list[Any]:
    return (
        [None if isinstance(v, float) and np.isnan(v) else v for v in values.tolist()]
        if values.ndim == 1
        else [_jsonable(row) for row in values]
    )


def write_plots(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write the accuracy-matrix heat map and the accuracy-over-time curve as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    matrix = np.array(report["accuracy_matrix"], dtype=float)
    if matrix.size:
        fig, ax = plt.subplots(figsize=(1 + 0.7 * matrix.shape[1], 1 + 0.5 * matrix.shape[0]))
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (i, g), value in np.ndenumerate(matrix):
            ax.text(g, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white")
        ax.set_xlabel(f"{report['group_kind']} (held-out probe)")
        ax.set_ylabel("evaluation point")
        ax.set_title("accuracy matrix R[i][g]")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        written.append(out_dir / "accuracy_matrix.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    curve = report["accuracy_curve"]
    if curve:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        seen = [p["samples_seen"] for p in curve]
        ax.plot(seen, [p["average_accuracy"] for p in curve], marker="o", label="average accuracy")
        ax.plot(seen, [p["prequential_window"] for p in curve], label="prequential (window)")
        ax.set_xlabel("samples seen")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(out_dir / "average_accuracy.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def find_condensed(state: Any) -> dict[str, Any] | None:
    """The condensed set's state inside a checkpoint's nested state, or None."""
    if isinstance(state, dict):
        found = state.get("condensed")
        if isinstance(found, dict) and "exemplars" in found:
            return found
        children: Any = state.values()
    elif isinstance(state, list | tuple):
        children = state
    else:
        return None
    for child in children:
        found = find_condensed(child)
        if found is not None:
            return found
    return None


def condensed_grid(condensed: dict[str, Any]) -> tuple[np.ndarray, list[int]]:
    """The grid image `[rows, cols, 3]` in [0, 1] of a condensed set's state, and its classes.

    Rows are the classes that have condensed exemplars, columns their exemplars; each
    exemplar is drawn `GRID_SCALE` times enlarged with `GRID_GAP` pixels between cells,
    grey for one channel, RGB for three, the channel mean otherwise.
    """
    shape = tuple(int(v) for v in condensed.get("shape", ()))
    image = image_shape(shape)
    if image is None:
        raise ConfigError(
            f"condensed exemplars of shape {list(shape)} are not images ([H*W], [H, W] "
            f"or [C, H, W]): no grid to draw"
        )
    classes = np.flatnonzero(condensed["weight"].numpy() > 0)
    if not len(classes):
        raise ConfigError("the checkpoint's condensed set holds no exemplars yet")
    low, high = (float(v) for v in condensed["range"].tolist())
    cells = condensed["exemplars"].numpy()[classes].reshape(len(classes), -1, *image)
    cells = np.clip((cells - low) / max(high - low, 1e-12), 0, 1)
    cells = cells.transpose(0, 1, 3, 4, 2)  # [rows, cols, H, W, C]
    if image[0] != 3:
        cells = np.repeat(cells.mean(axis=-1, keepdims=True), 3, axis=-1)
    cells = cells.repeat(GRID_SCALE, axis=2).repeat(GRID_SCALE, axis=3)
    rows, cols, h, w = cells.shape[:4]
    grid = np.ones((rows * (h + GRID_GAP) - GRID_GAP, cols * (w + GRID_GAP) - GRID_GAP, 3))
    for r in range(rows):
        for c in range(cols):
            top, left = r * (h + GRID_GAP), c * (w + GRID_GAP)
            grid[top : top + h, left : left + w] = cells[r, c]
    return grid, classes.tolist()


def write_condensed_grid(condensed: dict[str, Any], path: str | Path) -> list[int]:
    """Write the condensed exemplars as a PNG grid (rows = classes); return the row classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, classes = condensed_grid(condensed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, grid)
    return classes
