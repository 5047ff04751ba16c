"""`streamcl replay`: run the learner over a recorded stream and report what it learned."""

from __future__ import annotations

import logging
import time
from typing import Any

from tqdm import tqdm

from deploy.config import ReplayConfig
from deploy.session import LearningSession, environment
from deploy.wiring import build_learner, configure_threads
from ingest import heldout as heldout_io
from ingest.codec import decode
from ingest.heldout import HeldOut
from ingest.recorded import CorruptFrame, StreamReader
from ingest.schema import Origin, Rejected

log = logging.getLogger(__name__)
DEFAULT_THREADS = 1


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
        corrupt = 0
        topic = str(config.stream)
        learn_started = time.perf_counter()
        for item in bar:
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
        session.flush()
        session.evaluate()
        # Probe evaluation is reported on its own; throughput counts the streaming work.
        learn_seconds = time.perf_counter() - learn_started - session.evaluation_seconds
    return {
        **session.report(corrupt_frames=corrupt),
        "samples_per_second": session.samples_learned / learn_seconds if learn_seconds else 0.0,
        "evaluation_seconds": session.evaluation_seconds,
        "wall_seconds": time.perf_counter() - started,
        # Enough to reproduce the run; where its outputs went is not part of it.
        "config": config.model_dump(mode="json", exclude={"report", "plots"}),
        "environment": environment(learner),
    }


def load_heldout(stream: Any, explicit: Any = None) -> HeldOut | None:
    """The explicit held-out file, else the sidecar beside the stream, else None (warned)."""
    path = explicit or heldout_io.sidecar_path(stream)
    if explicit is None and not path.exists():
        log.warning("no held-out set at %s: only prequential accuracy will be reported", path)
        return None
    return heldout_io.load(path)
