"""Report sections shared by `replay` and `serve`: how the learner saw tasks, where it ran.

Both commands build their reports from these, so neither imports the other.
"""

from __future__ import annotations

import platform
from typing import Any

import torch

from streamcl.learner.loop import OnlineLearner


def strategy_section(learner: OnlineLearner) -> dict[str, Any]:
    """How the learner saw tasks: evaluation scenario, detector events, task boundaries.

    Every boundary (task-id change, detector event on a task-free batch, or periodic)
    is a consolidation for the strategies; a detector event on a batch with task ids
    is counted but is not a boundary. Event lists hold the latest `RECENT_EVENTS`.
    """
    detector = learner.detector
    events = detector.events if detector is not None else []
    return {
        # Task-incremental: predictions are given each probe row's task id.
        "scenario": "task-incremental" if learner.task_aware else "task-agnostic",
        # The latest events (all of them up to RECENT_EVENTS); the counts cover every one.
        "drift_events": [event.sample for event in events],
        "drift_event_count": detector.event_count if detector is not None else 0,
        "drift_event_reasons": [event.reason for event in events],
        "task_boundaries": learner.boundaries.total,
        "task_boundaries_by_reason": dict(sorted(learner.boundaries.by_reason.items())),
        **({"memory": learner.memory.usage()} if learner.memory is not None else {}),
    }


def environment(learner: OnlineLearner) -> dict[str, Any]:
    """Where the run's figures came from: device, threads, versions."""
    return {
        "device": str(learner.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
