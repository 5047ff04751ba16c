"""`streamcl serve`: the long-running learner fed from Kafka.

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
from collections import deque
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from streamcl.deploy.runtime.config import LearnerConfig, ServiceConfig
from streamcl.deploy.runtime.metrics import ServiceMetrics, record_memory
from streamcl.deploy.runtime.replay import strategy_section
from streamcl.deploy.runtime.resume import plan_resume
from streamcl.deploy.runtime.retry import Backoff
from streamcl.deploy.runtime.session import LearningSession, environment
from streamcl.deploy.runtime.wiring import build_learner, configure_threads
from streamcl.evaluation.report import metric_section
from streamcl.evaluation.reservoir import ProbeReservoir
from streamcl.ingest import heldout as heldout_io
from streamcl.ingest.codec import encode
from streamcl.ingest.kafka import (
    DEAD_LETTER_SUFFIX,
    QUARANTINE_SUFFIX,
    Arrival,
    DeadLetterSink,
    KafkaSettings,
    KafkaSource,
    KafkaSourceError,
    Offsets,
    UnreadableBatchError,
    ensure_topic,
    wait_for_bootstrap,
)
from streamcl.ingest.offsets import Reset, read_topic_state
from streamcl.ingest.schema import Batch, Rejected, Sample, StreamSpec
from streamcl.learner.checkpoint import (
    CheckpointError,
    CheckpointStore,
    serialised_size,
    write_snapshot,
)
from streamcl.learner.strategies import replay_buffer

log = logging.getLogger(__name__)
REPORTED_LATENCIES = 100_000
"""Arrival-to-update latencies the final report's p50/p99 are taken over (the latest)."""
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


def kafka_settings(config: ServiceConfig) -> KafkaSettings:
    k = config.kafka
    return KafkaSettings(
        bootstrap_servers=k.bootstrap_servers,
        client_id=k.client_id,
        security_protocol=k.security_protocol,
        sasl_mechanism=k.sasl_mechanism,
        sasl_plain_username=k.sasl_plain_username,
        sasl_plain_password=_secret(k.sasl_plain_password),
        ssl_cafile=k.ssl_cafile,
        ssl_certfile=k.ssl_certfile,
        ssl_keyfile=k.ssl_keyfile,
        ssl_password=_secret(k.ssl_password),
        # The clients' own bootstrap wait: after `wait_for_bootstrap`, the same limit.
        consumer={"bootstrap_timeout_ms": int(k.connect_timeout_s * 1000), **k.consumer},
        producer={"bootstrap_timeout_ms": int(k.connect_timeout_s * 1000), **k.producer},
    )


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


class Service:
    """One learner, one consumer group member, one checkpoint directory."""

    def __init__(self, config: ServiceConfig, registry: CollectorRegistry | None = None):
        self.config = config
        self.metrics = ServiceMetrics(registry or CollectorRegistry())
        settings = kafka_settings(config)
        wait_for_bootstrap(settings, config.kafka.connect_timeout_s)  # before any slow set-up
        configure_threads(config.learner.threads)
        self.spec = StreamSpec(
            config.spec.feature_shape, config.spec.dtype, config.spec.num_classes
        )
        self.learner = build_learner(config.learner, self.spec)
        self.session = LearningSession(
            self.learner,
            heldout_io.load(config.heldout) if config.heldout else None,
            config.learner.batch_size,
            config.eval_every,
            config.prequential_window,
            on_learned=self._learned,
            probe=self._probe(config),
            on_evaluated=self._evaluated,
            on_quarantined=self._quarantined,
        )
        self.memory = replay_buffer(self.learner.strategies)
        if self.memory is not None:
            self.metrics.memory_capacity.set(self.memory.capacity)
        if self.learner.device.type == "cuda":
            device = self.learner.device
            self.metrics.track_device_memory(lambda: torch.cuda.memory_allocated(device))
        self.checkpoints = CheckpointStore(config.checkpoint.dir, config.checkpoint.keep)
        self.checkpoint_retry = Backoff(
            "checkpoint",
            log,
            config.checkpoint.retry_min_seconds,
            config.checkpoint.retry_max_seconds,
        )
        self.metrics.checkpoint_age_limit.set(config.checkpoint.max_age_seconds)
        self.metrics.track_checkpoint_age(self._checkpoint_age)
        self._check_space()
        self.dead_letters = self._side_sink(
            config.kafka.dead_letter_topic or config.kafka.topic + DEAD_LETTER_SUFFIX
        )
        self.quarantine_sink = self._side_sink(
            config.kafka.quarantine_topic or config.kafka.topic + QUARANTINE_SUFFIX
        )
        self._filter_counts = dict(self.session.filtering.counts)
        self.source = self._new_source()
        self.model_lock = threading.RLock()  # checkpoint() may run inside the learning loop
        self.last_progress = time.monotonic()
        self.ready = False
        # The report's percentiles: the latest arrivals (Prometheus' histogram has them all).
        self.latencies_ms: deque[float] = deque(maxlen=REPORTED_LATENCIES)
        self.checkpoint_seconds = 0.0
        self.last_checkpoint_at = time.monotonic()
        self._arrival_ms: dict[tuple[int, int], int] = {}
        self._first_arrival: float | None = None
        self._lag_partitions: set[int] = set()
        self._past_end: set[int] = set()
        self.resets: list[Reset] = []
        self._drift_events_seen = 0
        self._last_learned = 0.0
        self._learned_at_start = 0
        self._updates_at_checkpoint = 0
        self._updates_at_snapshot = 0
        self._progress_at = time.monotonic()
        self._progress_learned = 0
        self._audit: TextIO | None = None
        if config.audit_log is not None:
            config.audit_log.parent.mkdir(parents=True, exist_ok=True)
            self._audit = open(config.audit_log, "a")  # noqa: SIM115 - closed in close()

    def _probe(self, config: ServiceConfig) -> ProbeReservoir | None:
        if config.heldout is not None or config.probe.fraction == 0:
            return None
        return ProbeReservoir(
            config.probe.fraction,
            config.probe.per_class,
            self.spec.num_classes,
            self.spec.feature_shape,
            self.spec.dtype,
            seed=config.learner.seed + 3,
        )

    def restore(self) -> Offsets | None:
        """Load the newest usable checkpoint; returns its offsets (None: no checkpoint)."""
        restored = self.checkpoints.load_latest()
        if restored is None:
            return None
        for skipped in restored.skipped:
            self.metrics.checkpoint_load_failures.labels(skipped.reason).inc()
        state = restored.state
        _check_compatible(json.loads(state["learner_config"]), self.config.learner, restored.path)
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
        self._filter_counts = dict(self.session.filtering.counts)
        self.metrics.quarantine_items.set(self.session.in_quarantine)
        offsets = {(str(t), int(p)): int(o) for t, p, o in state["offsets"]}
        self._updates_at_checkpoint = self._updates_at_snapshot = self.learner.updates
        self.metrics.model_version.set(self.learner.updates)
        self.metrics.last_checkpoint.set(restored.path.stat().st_mtime)
        self.metrics.checkpoint_bytes.set(restored.path.stat().st_size)
        if self.learner.detector is not None:
            self._drift_events_seen = self.learner.detector.event_count
        if self.session.matrix.rows:
            self._evaluated(self.session)
        log.info(
            "restored checkpoint path=%s updates=%d offsets=%s",
            restored.path,
            self.learner.updates,
            offsets,
        )
        return offsets

    def run(self, stop: threading.Event) -> dict[str, Any]:
        """Consume until `stop` is set (or the topic stays idle); returns the final report."""
        started = time.monotonic()
        resume = self._resume_offsets(self.restore())
        self.source.start(resume)
        self.ready = True
        kafka = self.config.kafka
        log.info(
            "consuming topic %s as group %s from offsets %s",
            kafka.topic,
            kafka.group_id,
            {f"{t}/{p}": o for (t, p), o in sorted(resume.items())}
            if resume
            else "committed by the group (earliest where none)",
        )
        self._progress_at, self._progress_learned = started, self.session.samples_learned
        self._learned_at_start = self.session.samples_learned
        idle_since = time.monotonic()
        while not stop.is_set():
            try:
                arrivals = self.source.poll(kafka.poll_timeout_ms, kafka.max_records)
            except UnreadableBatchError:
                # on_unreadable: stop. Keep what was learned before the batch, then stop once.
                self.metrics.unreadable_batches.inc()
                self._final_checkpoint()
                raise
            now = time.monotonic()
            self.last_progress = now
            self.metrics.last_poll.set(time.time())
            self._export_lag()
            if not arrivals and self.session.pending:
                # The stream paused: learn the partial batch now rather than letting it
                # wait for traffic (a quiet topic must not hide samples from the model).
                with self.model_lock:
                    self.session.flush()
            if not self.source.assignment():
                idle_since = now  # no partitions (yet): a quiet topic is not a finished one
            if arrivals:
                idle_since = now
                if self._first_arrival is None:
                    self._first_arrival = now
                self._handle(arrivals)
            if self._checkpoint_due(now):
                self.checkpoint()
            if self.config.log_every and now - self._progress_at >= self.config.log_every:
                self._log_progress(now)
            if self._idle_enough(now - idle_since):
                log.info("no messages for %.1f s and no lag: stopping", now - idle_since)
                # The stream is over: learn the partial batch and score the final model.
                with self.model_lock:
                    self.session.flush()
                    self.session.evaluate()
                break
        # On a signal, pending samples go into the checkpoint instead, for the next run.
        self._final_checkpoint()
        session = self.session
        log.info(
            "processed a total of %d messages learned=%d quarantined=%d rejected_noisy=%d "
            "rejected=%d held_out=%d pending=%d",
            session.samples_seen,
            session.samples_learned,
            session.in_quarantine,
            session.filtering.counts["rejected_noisy"],
            session.samples_rejected,
            session.samples_held_out,
            session.pending,
        )
        return self.report(time.monotonic() - started)

    def _new_source(self) -> KafkaSource:
        config = self.config
        return KafkaSource(
            kafka_settings(config),
            config.kafka.topic,
            config.kafka.group_id,
            self.spec,
            on_revoke=self._on_revoke,
            rebalance=config.kafka.rebalance,
            on_unreadable=config.kafka.on_unreadable,
        )

    def _on_revoke(self) -> object:
        """Partitions are being taken away: checkpoint and commit what was learned of them."""
        return self.checkpoint()

    def _resume_offsets(self, checkpoint: Offsets | None) -> Offsets:
        """Reconcile the checkpoint with the group's commits and each partition's log."""
        kafka = self.config.kafka
        state = read_topic_state(
            kafka_settings(self.config), kafka.topic, kafka.group_id, kafka.connect_timeout_s
        )
        resume, self.resets = plan_resume(
            checkpoint, state, self.config.resume, kafka.group_id, self.config.checkpoint.dir
        )
        for reset in self.resets:
            self.metrics.offset_out_of_range.labels(reset.reason).inc()
        return resume

    def _log_progress(self, now: float) -> None:
        """One periodic line, like Kafka's console tools: totals, rate, lag, accuracy."""
        session = self.session
        rate = (session.samples_learned - self._progress_learned) / (now - self._progress_at)
        accuracy = session.matrix.get().average_accuracy if session.matrix.rows else None
        log.info(
            "progress learned=%d samples_per_second=%.1f lag=%d rejected=%d updates=%d "
            "prequential_accuracy=%.4f average_accuracy=%s",
            session.samples_learned,
            rate,
            sum(self.source.lag().values()),
            session.samples_rejected,
            self.learner.updates,
            session.prequential.get_windowed(),
            "n/a" if accuracy is None else f"{accuracy:.4f}",
        )
        self._progress_at, self._progress_learned = now, session.samples_learned

    def _handle(self, arrivals: list[Arrival]) -> None:
        """Learn or dead-letter each arrival; checkpoint as soon as one is due, mid-poll."""
        for arrival in arrivals:
            item = arrival.item
            with self.model_lock:
                if isinstance(item, Rejected):
                    self.dead_letters.send(item, arrival.key, arrival.headers, arrival.timestamp_ms)
                    self.session.reject(item.reason, item.count)
                    self.metrics.samples.labels("rejected").inc(item.count)
                    self.metrics.rejected.labels(item.reason).inc(item.count)
                    if item.last_offset is not None:
                        self.metrics.unreadable_batches.inc()
                else:
                    key = None
                    if item.origin is not None:
                        # Recorded before offer(): a full batch is learned inside it.
                        key = (item.origin.partition, item.origin.offset)
                        self._arrival_ms[key] = arrival.timestamp_ms
                    if not self.session.offer(item):
                        self.metrics.samples.labels("held_out").inc()
                        if key is not None:  # diverted to the probe: never learned
                            self._arrival_ms.pop(key, None)
                if item.origin is not None:
                    last = item.last_offset if isinstance(item, Rejected) else None
                    self.source.mark_handled(item.origin, last)
            if self._checkpoint_due(time.monotonic()):
                self.checkpoint()

    def _final_checkpoint(self, attempts: int = 5) -> None:
        for attempt in range(attempts):
            if self.checkpoint():
                return
            time.sleep(min(2.0, 0.2 * 2**attempt))
        raise CheckpointError(
            f"final checkpoint failed {attempts} times (see the log): offsets not committed; "
            "a restart resumes from the previous checkpoint"
        )

    def checkpoint(self) -> bool:
        """Make dead letters durable, save the state (pending samples included), commit.

        Returns False (and commits nothing) when dead letters could not be delivered or
        the file could not be written: committing then could lose messages, so the next
        checkpoint retries.
        """
        began = time.monotonic()
        with self.model_lock:
            try:
                self.dead_letters.flush()
                self.quarantine_sink.flush()
            except KafkaSourceError as err:
                self._checkpoint_failed(f"dead letters not delivered error={_one_line(err)}")
                return False
            offsets = dict(self.source.handled)
            state = {
                "learner": self.learner.state_dict(),
                "session": self.session.state_dict(),
                "offsets": [[t, p, o] for (t, p), o in sorted(offsets.items())],
                "learner_config": self.config.learner.model_dump_json(),
            }
            try:
                path = self.checkpoints.save(state)
            except Exception as err:
                # A full disk surfaces as OSError or as torch's RuntimeError from its zip
                # writer; whatever the serialiser raises: keep learning, commit nothing,
                # retry with backoff.
                self._checkpoint_failed(f"dir={self.checkpoints.directory} error={_one_line(err)}")
                return False
            self.metrics.checkpoint_bytes.set(path.stat().st_size)
            self._updates_at_checkpoint = self.learner.updates
            if self._snapshot_due():
                self._snapshot(offsets)
        self.source.commit(offsets)
        self.checkpoint_retry.succeeded()
        self.last_checkpoint_at = time.monotonic()
        self.checkpoint_seconds = self.last_checkpoint_at - began
        self.metrics.checkpointed(self.checkpoint_seconds)
        log.info(
            "checkpoint path=%s updates=%d offsets=%s seconds=%.3f",
            path,
            self.learner.updates,
            offsets,
            self.checkpoint_seconds,
        )
        return True

    def _checkpoint_failed(self, detail: str) -> None:
        """Count it; log the first failure and then a summary at a bounded rate."""
        self.metrics.checkpoint_failures.inc()
        self.checkpoint_retry.failed(detail)

    def _checkpoint_age(self) -> float:
        """Seconds of learning not yet in a checkpoint (0 when all of it is)."""
        if self.learner.updates == self._updates_at_checkpoint:
            return 0.0
        return time.monotonic() - self.last_checkpoint_at

    def _side_sink(self, topic: str) -> DeadLetterSink:
        """A sink for dead letters or quarantined samples, its topic created if missing."""
        kafka = self.config.kafka
        settings = kafka_settings(self.config)
        partitions = ensure_topic(
            settings, topic, kafka.side_topic_partitions, kafka.side_topic_replication, kafka.topic
        )
        return DeadLetterSink(settings, topic, partitions)

    def _check_space(self) -> None:
        """Warn when the checkpoint volume cannot hold keep + 1 checkpoints.

        The size is the newest checkpoint's, else the fresh state's with a full replay
        memory (an estimate: the filters' windows grow too).
        """
        paths = self.checkpoints.paths()
        if paths:
            size = paths[-1].stat().st_size
        else:
            size = serialised_size(self.learner.state_dict())
            if self.memory is not None:  # saved up to its size: add it as if full
                size += self.memory.nbytes  # (the store is allocated at capacity)
        needed = self.checkpoints.space_needed(size)
        free = shutil.disk_usage(self.checkpoints.directory).free
        if free < needed:
            log.warning(
                "checkpoint volume too small dir=%s free_bytes=%d needed_bytes=%d "
                "checkpoint_bytes=%d keep=%d: a new checkpoint is written before the oldest "
                "is removed, so it needs room for keep + 1",
                self.checkpoints.directory,
                free,
                needed,
                size,
                self.checkpoints.keep,
            )

    def predict_proba(self, features: np.ndarray) -> tuple[np.ndarray, int]:
        """Class probabilities `[N, C]` from the live model and its version (updates)."""
        with self.model_lock:
            return self.learner.predict_proba(features), self.learner.updates

    def report(self, wall_seconds: float) -> dict[str, Any]:
        latencies = np.array(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        streaming = self._last_learned - (self._first_arrival or self._last_learned)
        streaming -= self.session.evaluation_seconds
        return {
            **self.session.report(),
            **strategy_section(self.learner),
            # From the first message to the last update, probe evaluation excluded.
            "samples_per_second": self.learner.samples / streaming if streaming > 0 else 0.0,
            "evaluation_seconds": self.session.evaluation_seconds,
            "committed_offsets": {f"{t}/{p}": o for (t, p), o in self.source.handled.items()},
            "samples_learned_this_run": self.session.samples_learned - self._learned_at_start,
            "offset_resets": [reset.as_dict() for reset in self.resets],
            "arrival_to_update_ms": {
                "p50": float(np.percentile(latencies, 50)),
                "p99": float(np.percentile(latencies, 99)),
            },
            "wall_seconds": wall_seconds,
            "config": self.config.model_dump(mode="json"),
            "environment": environment(self.learner),
        }

    def close(self) -> None:
        self.source.close()
        self.dead_letters.close()
        self.quarantine_sink.close()
        if self._audit is not None:
            self._audit.close()

    def _learned(self, batch: Batch, update_seconds: float) -> None:
        self._last_learned = time.monotonic()
        m = self.metrics
        detector = self.learner.detector
        if detector is not None and detector.event_count > self._drift_events_seen:
            m.drift_events.inc(detector.event_count - self._drift_events_seen)
            self._drift_events_seen = detector.event_count
        self._export_filtering()
        m.updates.inc(self.learner.steps_per_batch)
        m.update_seconds.observe(update_seconds)
        m.model_version.set(self.learner.updates)
        m.prequential.set(self.session.prequential.get_windowed())
        if self.memory is not None:
            m.memory_items.set(len(self.memory))
            m.memory_bytes.set(self.memory.nbytes)
            record_memory(m, self.memory.usage())
        now_ms = time.time() * 1000
        for origin in batch.origins:
            if origin is not None:
                arrived = self._arrival_ms.pop((origin.partition, origin.offset), None)
                if arrived is not None:
                    m.arrival_to_update.observe(max(0.0, now_ms - arrived) / 1000)
                    self.latencies_ms.append(now_ms - arrived)
        if self._audit is not None:
            pairs = [[o.partition, o.offset] for o in batch.origins if o is not None]
            self._audit.write(
                json.dumps({"updates": self.learner.updates, "learned": pairs}) + "\n"
            )
            self._audit.flush()

    def _quarantined(self, batch: Batch, rows: np.ndarray, reasons: tuple[str, ...]) -> None:
        """Copy suspect samples to the quarantine topic, the filter that flagged them in headers."""
        for row, reason in zip(rows.tolist(), reasons, strict=True):
            origin = batch.origins[row] if batch.origins else None
            sample = Sample(
                batch.features[row],
                int(batch.labels[row]),
                int(batch.tasks[row]),
                int(batch.sample_ids[row]),
                int(batch.event_times_ms[row]),
            )
            self.quarantine_sink.send(
                Rejected(encode(sample), f"suspect_label_{reason}", f"filter={reason}", origin)
            )

    def _export_filtering(self) -> None:
        """Outcome counters by the filter's decisions since the last export; quarantine size."""
        m = self.metrics
        counts = self.session.filtering.counts
        delta = {k: counts[k] - self._filter_counts.get(k, 0) for k in counts}
        self._filter_counts = dict(counts)
        m.samples.labels("learned").inc(delta["admitted"])
        m.samples.labels("quarantined").inc(delta["quarantined"])
        m.quarantine_decisions.labels("readmitted").inc(delta["readmitted"])
        m.quarantine_decisions.labels("rejected_noisy").inc(delta["rejected_noisy"])
        m.quarantine_items.set(self.session.in_quarantine)

    def _export_lag(self) -> None:
        lag = self.source.lag()
        for partition in self._lag_partitions - lag.keys():
            self.metrics.lag.remove(str(partition))  # revoked: its series must not linger
        for partition, messages in lag.items():
            self.metrics.lag.labels(str(partition)).set(messages)
        self._lag_partitions = set(lag)
        past_end = {p for p, messages in lag.items() if messages < 0}
        for partition in sorted(past_end - self._past_end):
            # The log shrank under us (topic recreated while running): shown, never hidden.
            log.warning(
                "position past the log end partition=%d messages_past_end=%d: the topic was "
                "recreated or truncated; restart to apply resume.out_of_range",
                partition,
                -lag[partition],
            )
            self.metrics.offset_out_of_range.labels("past_end").inc()
        self._past_end = past_end

    def _evaluated(self, session: LearningSession) -> None:
        summary = session.matrix.get()
        m = self.metrics
        m.evaluations.inc()
        m.average_accuracy.set(summary.average_accuracy)
        m.average_forgetting.set(summary.average_forgetting)
        m.backward_transfer.set(summary.backward_transfer)
        forgetting = session.matrix.group_forgetting()
        m.set_groups(
            [float(v) for v in session.matrix.rows[-1]],
            [None if np.isnan(v) else float(v) for v in forgetting],
        )
        if session.probe is not None:
            m.probe_items.set(len(session.probe))

    def _checkpoint_due(self, now: float) -> bool:
        c = self.config.checkpoint
        moved = self.learner.updates - self._updates_at_checkpoint
        due = moved >= c.every_updates or (
            moved > 0 and now - self.last_checkpoint_at >= c.every_seconds
        )
        return due and self.checkpoint_retry.ready()

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

    def _idle_enough(self, idle_seconds: float) -> bool:
        """`until_idle` seconds without a message while partitions are assigned, no lag."""
        limit = self.config.until_idle
        if limit is None or idle_seconds < limit:
            return False
        lag = self.source.lag()
        assigned = self.source.assignment()
        # Caught up: every assigned partition's lag is known (fetched) and exactly 0. Not
        # the sum: a partition past its end (negative lag) must not cancel another's.
        caught_up = bool(assigned) and lag.keys() >= set(assigned) and not any(lag.values())
        return caught_up or idle_seconds >= 3 * limit


def _check_compatible(saved: dict[str, Any], current: LearnerConfig, path: Path) -> None:
    now = current.model_dump(mode="json")
    changed = [
        f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in SHAPING_FIELDS if saved.get(k) != now[k]
    ]
    if changed:
        raise CheckpointError(
            f"checkpoint {path} was written with a different learner ({'; '.join(changed)}); "
            f"use another checkpoint.dir or the original settings"
        )


def _one_line(err: BaseException) -> str:
    """`Type: message` with its cause (torch's zip writer wraps the OSError), on one line."""
    text = f"{type(err).__name__}: {err}"
    if err.__cause__ is not None:
        text += f" (from {type(err.__cause__).__name__}: {err.__cause__})"
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:300] + "..."
