"""`streamcl replay`: run the learner over a recorded stream and report what it learned.

A replay can stop after N messages and save itself (`stop_after`, `checkpoint`), and a
later process can `resume` it: learner, session (pending partial batch included) and
the stream position are restored, so the finished report equals an uninterrupted run's.
The checkpoint is a streamcl checkpoint (learner/checkpoint.py): tensors and plain
containers only, with a content checksum verified on load.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from streamcl.deploy.runtime.config import ReplayConfig
from streamcl.deploy.runtime.sections import environment, strategy_section
from streamcl.deploy.runtime.session import LearningSession
from streamcl.deploy.runtime.wiring import build_learner, configure_threads
from streamcl.ingest import heldout as heldout_io
from streamcl.ingest.codec import decode_many
from streamcl.ingest.errors import ConfigError, DataError
from streamcl.ingest.heldout import HeldOut
from streamcl.ingest.recorded import CorruptFrame, Frame, StreamReader
from streamcl.ingest.schema import Origin
from streamcl.learner.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from streamcl.learner.loop import OnlineLearner

log = logging.getLogger(__name__)
DEFAULT_THREADS = 1
DECODE_FRAMES = 256
"""Frames decoded together: one array per field, checked at once (`decode_many`)."""
# Where outputs go and how a run was split: not part of what the run computes.
REPLAY_KEYS = {"config", "position", "learner", "session"}
"""What `save` writes, and `restore` needs."""
RUN_ONLY_SETTINGS = {"report", "plots", "stop_after", "checkpoint", "resume", "allow_partial"}


def run_replay(config: ReplayConfig, progress: bool | None = None) -> dict[str, Any]:
    """Replay `config.stream` through a fresh learner; returns the report dict."""
    configure_threads(config.threads)
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
        tally = reader.tally()
        position = restore(config, learner, session) if config.resume is not None else 0
        resumed_at = position
        topic = str(config.stream)
        frames: list[Frame] = []

        def learn_frames() -> None:
            """Decode the frames read so far into one batch and offer it."""
            if not frames:
                return
            origins = [Origin(topic, 0, frame.offset) for frame in frames]
            batch, rejects = decode_many([f.payload for f in frames], reader.spec, origins)
            for rejected in rejects:
                session.reject(rejected.reason)
            if batch is not None:
                session.offer_batch(batch)
            frames.clear()

        learn_started = time.perf_counter()
        for consumed, item in enumerate(bar):
            if consumed == config.stop_after:
                break
            tally.count(item)
            if consumed < resumed_at:
                continue
            position = consumed + 1
            if isinstance(item, CorruptFrame):
                log.warning(
                    "corrupt frame skipped position=%d bytes=%d detail=%s",
                    item.position,
                    item.size,
                    item.detail,
                )
                continue
            frames.append(item)
            if len(frames) == DECODE_FRAMES:
                learn_frames()
        learn_frames()
        stopped = config.stop_after is not None and position == config.stop_after
        if stopped and config.checkpoint is not None:
            save(config, learner, session, position)
        else:
            session.flush()
            session.evaluate()
        # Probe evaluation is reported on its own; throughput counts the streaming work.
        learn_seconds = time.perf_counter() - learn_started - session.evaluation_seconds
    return {
        **session.report(corrupt_frames=len(tally.damaged)),
        # A stopped run read only part of the file: whether the stream is whole is unknown.
        **({} if stopped else {"stream_damage": tally.to_dict()}),
        **strategy_section(learner),
        **({"stopped_after": position, "checkpoint": str(config.checkpoint)} if stopped else {}),
        "samples_per_second": learner.samples / learn_seconds if learn_seconds else 0.0,
        "evaluation_seconds": session.evaluation_seconds,
        "wall_seconds": time.perf_counter() - started,
        # Enough to reproduce the run; where its outputs went is not part of it.
        "config": config.model_dump(mode="json", exclude=RUN_ONLY_SETTINGS),
        "environment": environment(learner),
    }


def check_outcome(report: dict[str, Any], config: ReplayConfig) -> None:
    """Fail a finished replay that learned nothing, or read a damaged stream unasked.

    Called after the report is written, so a failed run still leaves its figures.
    """
    if "stopped_after" in report:
        return
    damage = report["stream_damage"]["problem"]
    if report["samples_learned"] == 0:
        seen = report["samples_seen"]
        why = (
            "it holds no readable message"
            if seen == 0
            else f"{seen} message(s) seen, {report['samples_rejected']} rejected as invalid "
            f"{report['rejected_by_reason'] or ''}, {report['samples_quarantined']} in "
            f"quarantine, {report['samples_rejected_noisy']} rejected as noisy"
        )
        raise DataError(
            f"nothing learned from {config.stream}: {why}" + (f"; {damage}" if damage else "")
        )
    if damage and not config.allow_partial:
        raise DataError(
            f"stream {config.stream} is damaged: {damage}; learned {report['samples_learned']} "
            f"samples from the rest (--allow-partial accepts a damaged stream)"
        )


def load_heldout(stream: Path, explicit: Path | None = None) -> HeldOut | None:
    """The explicit held-out file, else the sidecar beside the stream, else None (warned)."""
    path = explicit or heldout_io.sidecar_path(stream)
    if explicit is None and not path.exists():
        log.warning("no held-out set at %s: only prequential accuracy will be reported", path)
        return None
    return heldout_io.load(path)


def save(
    config: ReplayConfig,
    learner: OnlineLearner,
    session: LearningSession,
    position: int,
) -> Path:
    """Write the run's state (learner, session, stream position) atomically to `checkpoint`."""
    path = Path(str(config.checkpoint))
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "config": config.model_dump(mode="json", exclude=RUN_ONLY_SETTINGS),
        "position": position,
        "learner": learner.state_dict(),
        "session": session.state_dict(),
    }
    write_checkpoint(path, state)
    log.info("replay checkpoint written path=%s position=%d", path, position)
    return path


def restore(config: ReplayConfig, learner: OnlineLearner, session: LearningSession) -> int:
    """Load `config.resume` into learner and session; returns the stream position."""
    path = Path(str(config.resume))
    state = read_checkpoint(path)
    if not set(state) >= REPLAY_KEYS:
        raise CheckpointError(f"{path} is a streamcl checkpoint, but not one of a replay")
    expected = config.model_dump(mode="json", exclude=RUN_ONLY_SETTINGS)
    if state["config"] != expected:
        changed = sorted(k for k in expected if state["config"].get(k) != expected[k])
        raise ConfigError(
            f"replay checkpoint {path} was written with other settings: {', '.join(changed)}"
        )
    learner.load_state_dict(state["learner"])
    session.load_state_dict(state["session"])
    return int(state["position"])
