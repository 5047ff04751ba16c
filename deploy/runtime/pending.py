"""A learning session's pending rows: samples offered one by one and row ranges of batches."""

from __future__ import annotations

import numpy as np

from streamcl.ingest.schema import Batch, Sample


def stacked(items: list[Sample | Batch]) -> Batch:
    """One batch of pending items in order (runs of samples stacked, batches joined)."""
    parts: list[Batch] = []
    run: list[Sample] = []
    for item in items:
        if isinstance(item, Batch):
            if run:
                parts.append(Batch.from_samples(run))
                run = []
            parts.append(item)
        else:
            run.append(item)
    if run:
        parts.append(Batch.from_samples(run))
    if len(parts) == 1:
        return parts[0]
    features, labels, tasks, sample_ids, times = (
        np.concatenate([getattr(p, name) for p in parts])
        for name in ("features", "labels", "tasks", "sample_ids", "event_times_ms")
    )
    origins = tuple(o for p in parts for o in (p.origins or (None,) * len(p)))
    return Batch(
        features,
        labels,
        tasks,
        sample_ids,
        times,
        origins if any(p.origins for p in parts) else (),
    )


def row(batch: Batch, i: int) -> Sample:
    """Row `i` of `batch` as a sample."""
    return Sample(
        batch.features[i],
        int(batch.labels[i]),
        int(batch.tasks[i]),
        int(batch.sample_ids[i]),
        int(batch.event_times_ms[i]),
        batch.origins[i] if batch.origins else None,
    )
