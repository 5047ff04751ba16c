"""`streamcl replay`: run the learner over a recorded stream and report what it learned.

A replay can stop after N messages and save itself (`stop_after`, `checkpoint`), and a
later process can `resume` it: learner, session (pending partial batch included) and
the stream position are restored, so the finished report equals an uninterrupted run's.
The checkpoint holds tensors and plain containers only (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from deploy.config import ReplayConfig
from deploy.session import LearningSession, environment
from deploy.wiring import build_learner, configure_threads
from ingest import heldout as heldout_io
from ingest.codec import decode
from ingest.errors import ConfigError
from ingest.heldout import HeldOut
from ingest.recorded import CorruptFrame, StreamReader
from ingest.schema import Origin, Rejected
from learner.checkpoint import CheckpointError, write_atomically
from learner.loop import OnlineLearner

log = logging.getLogger(__name__)
DEFAULT_THREADS = 1
# Where outputs go and how a run was split: not part of what the run computes.
RUN_ONLY_SETTINGS = {"report", "plots", "stop_after", "checkpoint", "resume"}


def run_replay(config: ReplayConfig, progress: bool | None = None) -> dict[str, Any]:
    """Replay `config.stream` through a fresh learner; returns the report dict."""
    configure_threads(config.threads or DEFAULT_THREADS)
    started = time.perf_counter()
    with StreamReader(config.stream) as reader:
        learner = build_learner(config, reader.spec)
        session = LearningSession(
            learner,
            load_heldout(config.stream, config.heldout),
            config.batch_size,
            config.eval_every,
            config.prequential_window,
        )
        bar = tqdm(
            reader,
            total=reader.header.get("num_messages"),
            unit="msg",
            desc="replay",
            disable=None if progress is None else not progress,
        )
        corrupt = position = 0
        if config.resume is not None:
            position, corrupt = restore(config, learner, session)
        resumed_at = position
        topic = str(config.stream)
        learn_started = time.perf_counter()
        for consumed, item in enumerate(bar):
            if consumed < resumed_at:
                continue
            if consumed == config.stop_after:
                break
            position = consumed + 1
            if isinstance(item, CorruptFrame):
                corrupt += 1
                log.warning(
                    "corrupt frame skipped position=%d detail=%s", item.position, item.detail
                )
                continue
            decoded = decode(item.payload, reader.spec, Origin(topic, 0, item.offset))
            if isinstance(decoded, Rejected):
                session.reject(decoded.reason)
            else:
                session.offer(decoded)
        stopped = config.stop_after is not None and position == config.stop_after
        if stopped and config.checkpoint is not None:
            save(config, learner, session, position, corrupt)
        else:
            session.flush()
            session.evaluate()
        # Probe evaluation is reported on its own; throughput counts the streaming work.
        learn_seconds = time.perf_counter() - learn_started - session.evaluation_seconds
    return {
        **session.report(corrupt_frames=corrupt),
        **strategy_section(learner),
        **({"stopped_after": position, "checkpoint": str(config.checkpoint)} if stopped else {}),
        "samples_per_second": learner.samples / learn_seconds if learn_seconds else 0.0,
        "evaluation_seconds": session.evaluation_seconds,
        "wall_seconds": time.perf_counter() - started,
        # Enough to reproduce the run; where its outputs went is not part of it.
        "config": config.model_dump(mode="json", exclude=RUN_ONLY_SETTINGS),
        "environment": environment(learner),
    }


def load_heldout(stream: Path, explicit: Path | None = None) -> HeldOut | None:
    """The explicit held-out file, else the sidecar beside the stream, else None (warned)."""
    path = explicit or heldout_io.sidecar_path(stream)
    if explicit is None and not path.exists():
        log.warning("no held-out set at %s: only prequential accuracy will be reported", path)
        return None
    return heldout_io.load(path)


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
    }


def save(
    config: ReplayConfig,
    learner: OnlineLearner,
    session: LearningSession,
    position: int,
    corrupt: int,
) -> Path:
    """Write the run's state (learner, session, stream position) atomically to `checkpoint`."""
    path = Path(str(config.checkpoint))
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "config": config.model_dump(mode="json", exclude=RUN_ONLY_SETTINGS),
        "position": position,
        "corrupt_frames": corrupt,
        "learner": learner.state_dict(),
        "session": session.state_dict(),
    }
    write_atomically(path, lambda f: torch.save(state, f))
    log.info("replay checkpoint written path=%s position=%d", path, position)
    return path


def restore(
    config: ReplayConfig, learner: OnlineLearner, session: LearningSession
) -> tuple[int, int]:
    """Load `config.resume` into learner and session; returns (position, corrupt frames)."""
    path = Path(str(config.resume))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, truncated or not a checkpoint at all
        raise CheckpointError(f"cannot load replay checkpoint {path}: {err}") from err
    expected = config.model_dump(mode="json", exclude=RUN_ONLY_SETTINGS)
    if state["config"] != expected:
        changed = sorted(k for k in expected if state["config"].get(k) != expected[k])
        raise ConfigError(
            f"replay checkpoint {path} was written with other settings: {', '.join(changed)}"
        )
    learner.load_state_dict(state["learner"])
    session.load_state_dict(state["session"])
    return int(state["position"]), int(state["corrupt_frames"])
