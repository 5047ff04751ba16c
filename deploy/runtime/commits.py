"""The checkpoint/commit coordinator: when a checkpoint is due, writing it, committing it.

Order of durability (DESIGN.md, delivery semantics): learn -> dead letters flushed ->
checkpoint written atomically (model, optimizer, memory, counters, offsets) -> offsets
committed. A crash anywhere leaves a checkpoint whose offsets match its model.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from streamcl.deploy.runtime.config import LearnerConfig, ServiceConfig
from streamcl.deploy.runtime.metrics import ServiceMetrics
from streamcl.deploy.runtime.retry import Backoff
from streamcl.deploy.runtime.session import LearningSession
from streamcl.evaluation.report import metric_section
from streamcl.ingest.kafka import DeadLetterSink, KafkaSource, KafkaSourceError, Offsets
from streamcl.ingest.schema import StreamSpec
from streamcl.learner.checkpoint import (
    CheckpointError,
    CheckpointStore,
    serialised_size,
    write_snapshot,
)
from streamcl.learner.loop import OnlineLearner
from streamcl.memory.buffer import ReplayBuffer

log = logging.getLogger(__name__)
# Settings that change what a checkpoint's tensors mean; a mismatch is a start-up error.
SHAPING_FIELDS = (
    "strategy",
    "model",
    "hidden",
    "optimizer",
    "memory",
    "memory_policy",
    "memory_condensed",
    "ewc",
    "packnet",
    "detector",
    "use_task_ids",
    "noise",
    "quarantine",
    "loss",
)


class Checkpoints:
    """The service's checkpoints: due when, written how, committed after, restored from.

    `lock` is the model's: a checkpoint holds it while it reads the learner's state, so
    it may run inside the learning loop or on a rebalance thread.
    """

    def __init__(
        self,
        config: ServiceConfig,
        learner: OnlineLearner,
        session: LearningSession,
        spec: StreamSpec,
        metrics: ServiceMetrics,
        lock: threading.RLock,
    ):
        self.config = config
        self.learner = learner
        self.session = session
        self.spec = spec
        self.metrics = metrics
        self.lock = lock
        self.store = CheckpointStore(config.checkpoint.dir, config.checkpoint.keep)
        self.retry = Backoff(
            "checkpoint",
            log,
            config.checkpoint.retry_min_seconds,
            config.checkpoint.retry_max_seconds,
        )
        self.seconds = 0.0
        """How long the latest checkpoint took."""
        self.last_at = time.monotonic()
        self._updates_at_checkpoint = 0
        self._updates_at_snapshot = 0
        metrics.checkpoint_age_limit.set(config.checkpoint.max_age_seconds)
        metrics.track_checkpoint_age(self.age)

    def paths(self) -> list[Path]:
        """The checkpoints held, oldest first."""
        return self.store.paths()

    def restore(self) -> Offsets | None:
        """Load the newest usable checkpoint into learner and session; its offsets (None:
        no checkpoint)."""
        restored = self.store.load_latest()
        if restored is None:
            return None
        for skipped in restored.skipped:
            self.metrics.checkpoint_load_failures.labels(skipped.reason).inc()
        state = restored.state
        check_compatible(json.loads(state["learner_config"]), self.config.learner, restored.path)
        try:
            self.learner.load_state_dict(state["learner"])
            self.session.load_state_dict(state["session"])
        except Exception as err:  # tensors of another shape (spec or user model changed), ...
            reason = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
            reason = reason if len(reason) <= 400 else reason[:400] + "..."
            raise CheckpointError(
                f"checkpoint {restored.path} does not fit the configured learner and spec "
                f"({type(err).__name__}: {reason}); use another checkpoint.dir or the "
                f"original settings"
            ) from err
        offsets = {(str(t), int(p)): int(o) for t, p, o in state["offsets"]}
        self.restored()
        self.metrics.last_checkpoint.set(restored.path.stat().st_mtime)
        self.metrics.checkpoint_bytes.set(restored.path.stat().st_size)
        log.info(
            "restored checkpoint path=%s updates=%d offsets=%s",
            restored.path,
            self.learner.updates,
            offsets,
        )
        return offsets

    def restored(self) -> None:
        """The learner's state came from a checkpoint: nothing of it is due yet."""
        self._updates_at_checkpoint = self._updates_at_snapshot = self.learner.updates

    def checkpoint(self, source: KafkaSource, sinks: Sequence[DeadLetterSink]) -> bool:
        """Make `sinks` durable, save the state (pending samples included), commit.

        Returns False (and commits nothing) when dead letters could not be delivered or
        the file could not be written: committing then could lose messages, so the next
        checkpoint retries.
        """
        began = time.monotonic()
        with self.lock:
            try:
                for sink in sinks:
                    sink.flush()
            except KafkaSourceError as err:
                self.failed(f"dead letters not delivered error={one_line(err)}")
                return False
            offsets = dict(source.handled)
            state = {
                "learner": self.learner.state_dict(),
                "session": self.session.state_dict(),
                "offsets": [[t, p, o] for (t, p), o in sorted(offsets.items())],
                "learner_config": self.config.learner.model_dump_json(),
            }
            try:
                path = self.store.save(state)
            except Exception as err:
                # A full disk surfaces as OSError or as torch's RuntimeError from its zip
                # writer; whatever the serialiser raises: keep learning, commit nothing,
                # retry with backoff.
                self.failed(f"dir={self.store.directory} error={one_line(err)}")
                return False
            self.metrics.checkpoint_bytes.set(path.stat().st_size)
            self.saved()
            if self._snapshot_due():
                self._snapshot(offsets)
        source.commit(offsets)
        self.committed(began)
        log.info(
            "checkpoint path=%s updates=%d offsets=%s seconds=%.3f",
            path,
            self.learner.updates,
            offsets,
            self.seconds,
        )
        return True

    def saved(self) -> None:
        """The learner's current state is in a checkpoint file."""
        self._updates_at_checkpoint = self.learner.updates

    def committed(self, began: float) -> None:
        """A checkpoint begun at `began` (monotonic) is written and its offsets committed."""
        self.retry.succeeded()
        self.last_at = time.monotonic()
        self.seconds = self.last_at - began
        self.metrics.checkpointed(self.seconds)

    def failed(self, detail: str) -> None:
        """Count it; log the first failure and then a summary at a bounded rate."""
        self.metrics.checkpoint_failures.inc()
        self.retry.failed(detail)

    def due(self, now: float) -> bool:
        """`every_updates` updates or `every_seconds` since the last one, unless backing off."""
        c = self.config.checkpoint
        moved = self.learner.updates - self._updates_at_checkpoint
        due = moved >= c.every_updates or (moved > 0 and now - self.last_at >= c.every_seconds)
        return due and self.retry.ready()

    def age(self) -> float:
        """Seconds of learning not yet in a checkpoint (0 when all of it is)."""
        if self.learner.updates == self._updates_at_checkpoint:
            return 0.0
        return time.monotonic() - self.last_at

    def check_space(self, memory: ReplayBuffer | None) -> None:
        """Warn when the checkpoint volume cannot hold keep + 1 checkpoints.

        The size is the newest checkpoint's, else the fresh state's with a full replay
        memory (an estimate: the filters' windows grow too).
        """
        paths = self.store.paths()
        if paths:
            size = paths[-1].stat().st_size
        else:
            size = serialised_size(self.learner.state_dict())
            if memory is not None:  # saved up to its size: add it as if full
                size += memory.nbytes  # (the store is allocated at capacity)
        needed = self.store.space_needed(size)
        free = shutil.disk_usage(self.store.directory).free
        if free < needed:
            log.warning(
                "checkpoint volume too small dir=%s free_bytes=%d needed_bytes=%d "
                "checkpoint_bytes=%d keep=%d: a new checkpoint is written before the oldest "
                "is removed, so it needs room for keep + 1",
                self.store.directory,
                free,
                needed,
                size,
                self.store.keep,
            )

    def _snapshot_due(self) -> bool:
        s = self.config.snapshot
        return (
            s.dir is not None
            and self.learner.updates - self._updates_at_snapshot >= s.every_updates
        )

    def _snapshot(self, offsets: Offsets) -> None:
        directory = self.config.snapshot.dir
        if directory is None:
            return
        session = self.session
        section = metric_section(session.matrix, session.prequential, None, session.group_kind, [])
        meta = {
            "samples_learned": session.samples_learned,
            "offsets": {f"{t}/{p}": o for (t, p), o in offsets.items()},
            "metrics": {
                "prequential_accuracy": session.prequential.get(),
                "average_accuracy": section["final_average_accuracy"],
                "null_reasons": section["null_reasons"],
            },
            "spec": self.spec.to_dict(),
            "model": self.config.learner.model,
        }
        write_snapshot(
            directory, self.learner.model, self.learner.updates, meta, self.config.snapshot.keep
        )
        self._updates_at_snapshot = self.learner.updates


def check_compatible(saved: dict[str, Any], current: LearnerConfig, path: Path) -> None:
    """Refuse a checkpoint whose shaping settings differ from the configured learner's."""
    now = current.model_dump(mode="json")
    changed = [
        f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in SHAPING_FIELDS if saved.get(k) != now[k]
    ]
    if changed:
        raise CheckpointError(
            f"checkpoint {path} was written with a different learner ({'; '.join(changed)}); "
            f"use another checkpoint.dir or the original settings"
        )


def one_line(err: BaseException) -> str:
    """`Type: message` with its cause (torch's zip writer wraps the OSError), on one line."""
    text = f"{type(err).__name__}: {err}"
    if err.__cause__ is not None:
        text += f" (from {type(err.__cause__).__name__}: {err.__cause__})"
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:300] + "..."
