"""Save and load a `LearningSession`: counters, trackers and the pending partial batch.

Pending samples are saved rather than learned early, so checkpoints never change batch
composition: a service run equals a replay of the same stream. Tensors and plain
containers only, so the state fits a streamcl checkpoint (learner/checkpoint.py).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from streamcl.deploy.runtime.pending import stacked
from streamcl.evaluation.probes import ProbeResult
from streamcl.ingest.schema import Batch, Origin, Sample

if TYPE_CHECKING:
    from streamcl.deploy.runtime.session import LearningSession


def session_state(session: LearningSession) -> dict[str, Any]:
    """The session's state as tensors and plain containers."""
    final = session.final_probe
    return {
        "pending": samples_state(session._pending),  # samples and row ranges of batches
        "samples_seen": session.samples_seen,
        "samples_learned": session.samples_learned,
        "samples_held_out": session.samples_held_out,
        "filtering": session.filtering.state_dict(),
        "class_counts": torch.from_numpy(session.class_counts.copy()),
        "probe": session.probe.state_dict() if session.probe is not None else None,
        "rejected": dict(session.rejected),
        "tasks": session._tasks.state_dict(),
        "next_eval": session._next_eval,
        "prequential": session.prequential.state_dict(),
        "matrix": session.matrix.state_dict(),
        "curve": [dict(point) for point in session.curve],
        "evaluated_at": session._evaluated_at,
        "final_probe": None
        if final is None
        else {
            "per_group": final.per_group.tolist(),
            "per_class": final.per_class.tolist(),
            "overall": final.overall,
        },
    }


def load_session_state(session: LearningSession, state: dict[str, Any]) -> None:
    """Restore what `session_state` saved into `session` (built with the same settings)."""
    session._pending = list(samples_from_state(state["pending"]))
    session._pending_rows = len(session._pending)
    session.samples_seen = int(state["samples_seen"])
    session.samples_learned = int(state["samples_learned"])
    session.samples_held_out = int(state["samples_held_out"])
    session.filtering.load_state_dict(state["filtering"])
    session.class_counts = state["class_counts"].numpy().copy()
    if session.probe is not None and state["probe"] is not None:
        session.probe.load_state_dict(state["probe"])
    session.rejected = Counter({str(k): int(v) for k, v in state["rejected"].items()})
    session._tasks.load_state_dict(state["tasks"])
    session._next_eval = int(state["next_eval"])
    session.prequential.load_state_dict(state["prequential"])
    session.matrix.load_state_dict(state["matrix"])
    session.curve.clear()
    session.curve.extend({k: float(v) for k, v in point.items()} for point in state["curve"])
    session._evaluated_at = int(state["evaluated_at"])
    probe = state["final_probe"]
    session.final_probe = (
        None
        if probe is None
        else ProbeResult(
            np.array(probe["per_group"], dtype=np.float64),
            np.array(probe["per_class"], dtype=np.float64),
            float(probe["overall"]),
        )
    )


def samples_state(samples: list[Sample | Batch]) -> dict[str, Any]:
    """Samples (or batches of them) as one tensor per field (their origins as plain lists)."""
    if not samples:
        return {"count": 0}
    batch = stacked(samples)
    return {
        "count": len(batch),
        "features": torch.from_numpy(batch.features.copy()),
        "labels": torch.from_numpy(batch.labels),
        "tasks": torch.from_numpy(batch.tasks),
        "sample_ids": torch.from_numpy(batch.sample_ids),
        "event_times_ms": torch.from_numpy(batch.event_times_ms),
        "origins": [[o.topic, o.partition, o.offset] if o else None for o in batch.origins],
    }


def samples_from_state(state: dict[str, Any]) -> list[Sample]:
    if not state["count"]:
        return []
    columns = [state[k].numpy() for k in ("labels", "tasks", "sample_ids", "event_times_ms")]
    features = state["features"].numpy()
    return [
        Sample(
            features[i],
            int(columns[0][i]),
            int(columns[1][i]),
            int(columns[2][i]),
            int(columns[3][i]),
            Origin(*origin) if origin else None,
        )
        for i, origin in enumerate(state["origins"])
    ]
