"""`streamcl serve`: the long-running learner fed from Kafka, and its poll loop.

A prefetch thread polls and decodes (ingest/prefetch.py) while the loop learns; the loop
asks the checkpoint/commit coordinator (commits.py) when to make what it learned durable;
the metrics glue (exporter.py) keeps Prometheus' view current.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, TextIO

import numpy as np
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from streamcl.deploy.runtime.commits import Checkpoints
from streamcl.deploy.runtime.config import ServiceConfig
from streamcl.deploy.runtime.exporter import MetricsExporter
from streamcl.deploy.runtime.metrics import ServiceMetrics
from streamcl.deploy.runtime.resume import plan_resume
from streamcl.deploy.runtime.sections import environment, strategy_section
from streamcl.deploy.runtime.session import LearningSession
from streamcl.deploy.runtime.wiring import build_learner, configure_threads
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
    Offsets,
    UnreadableBatchError,
    ensure_topic,
    take,
    wait_for_bootstrap,
)
from streamcl.ingest.offsets import Reset, read_topic_state
from streamcl.ingest.prefetch import Prefetcher
from streamcl.ingest.schema import Batch, Rejected, Sample, StreamSpec
from streamcl.learner.checkpoint import CheckpointError
from streamcl.learner.strategies import replay_buffer

log = logging.getLogger(__name__)


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

    def __init__(
        self,
        config: ServiceConfig,
        registry: CollectorRegistry | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.config = config
        self.metrics = ServiceMetrics(registry or CollectorRegistry(), rank, world_size)
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
        self.exporter = MetricsExporter(self.metrics, self.learner, self.memory)
        self.model_lock = threading.RLock()  # checkpoint() may run inside the learning loop
        self.checkpoints = Checkpoints(
            config, self.learner, self.session, self.spec, self.metrics, self.model_lock
        )
        self.checkpoints.check_space(self.memory)
        self.dead_letters = self._side_sink(
            config.kafka.dead_letter_topic or config.kafka.topic + DEAD_LETTER_SUFFIX
        )
        self.quarantine_sink = self._side_sink(
            config.kafka.quarantine_topic or config.kafka.topic + QUARANTINE_SUFFIX
        )
        self.source = self._new_source()
        self.last_progress = time.monotonic()
        self.ready = False
        self._arrival_ms: dict[tuple[int, int], int] = {}
        self._first_arrival: float | None = None
        self.resets: list[Reset] = []
        self._last_learned = 0.0
        self._learned_at_start = 0
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
        offsets = self.checkpoints.restore()
        if offsets is not None:
            self.exporter.restored(self.session)
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
        with Prefetcher(self.source, kafka.poll_timeout_ms, kafka.max_records) as feed:
            while not stop.is_set():
                try:
                    arrivals = feed.get(kafka.poll_timeout_ms / 1000)
                except UnreadableBatchError:
                    # on_unreadable: stop. Keep what was learned before the batch, then stop
                    # once (the prefetch thread has ended: the consumer is free).
                    self.metrics.unreadable_batches.inc()
                    self._final_checkpoint()
                    raise
                now = time.monotonic()
                self.last_progress = min(now, feed.alive_at)
                self.metrics.last_poll.set(time.time() - (now - self.last_progress))
                lag, assigned = feed.lag(), feed.assignment()
                self._export_lag(lag)
                if not arrivals and self.session.pending:
                    # The stream paused: learn the partial batch now rather than letting it
                    # wait for traffic (a quiet topic must not hide samples from the model).
                    with self.model_lock:
                        self.session.flush()
                if not assigned:
                    idle_since = now  # no partitions (yet): a quiet topic is not a finished one
                if arrivals:
                    idle_since = now
                    if self._first_arrival is None:
                        self._first_arrival = now
                    self._handle(arrivals)
                if self._checkpoint_due(now):
                    self.checkpoint()
                if self.config.log_every and now - self._progress_at >= self.config.log_every:
                    self._log_progress(now, lag)
                if self._idle_enough(now - idle_since, lag, assigned):
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

    def _log_progress(self, now: float, lag: dict[int, int]) -> None:
        """One periodic line, like Kafka's console tools: totals, rate, lag, accuracy."""
        session = self.session
        rate = (session.samples_learned - self._progress_learned) / (now - self._progress_at)
        accuracy = session.matrix.get().average_accuracy if session.matrix.rows else None
        log.info(
            "progress learned=%d samples_per_second=%.1f lag=%d rejected=%d updates=%d "
            "prequential_accuracy=%.4f average_accuracy=%s",
            session.samples_learned,
            rate,
            sum(lag.values()),
            session.samples_rejected,
            self.learner.updates,
            session.prequential.get_windowed(),
            "n/a" if accuracy is None else f"{accuracy:.4f}",
        )
        self._progress_at, self._progress_learned = now, session.samples_learned

    def _handle(self, arrivals: list[Arrival]) -> None:
        """Learn or dead-letter each arrival, at most a batch of messages per hold of the
        model lock (so /predict and a revocation wait for one update at most); checkpoint
        as soon as one is due, mid-poll.

        An arrival fetched before its partition was revoked or reassigned is dropped: it
        is another member's now, or is fetched again from where this one stands.
        """
        stale = 0
        while arrivals:
            piece, arrivals = take(arrivals, self.session.batch_size)
            with self.model_lock, self.source.ownership:
                for arrival in piece:
                    if self.source.current(arrival):
                        self._handle_one(arrival)
                    else:
                        stale += arrival.size
            if self._checkpoint_due(time.monotonic()):
                self.checkpoint()
        if stale:
            log.info("dropped %d messages fetched before a rebalance of their partition", stale)

    def _handle_one(self, arrival: Arrival) -> None:
        item = arrival.item
        if isinstance(item, Rejected):
            timestamp = arrival.timestamps_ms[0]
            self.dead_letters.send(item, arrival.key, arrival.headers, timestamp)
            self.session.reject(item.reason, item.count)
            self.metrics.samples.labels("rejected").inc(item.count)
            self.metrics.rejected.labels(item.reason).inc(item.count)
            if item.last_offset is not None:
                self.metrics.unreadable_batches.inc()
            if item.origin is not None:
                self.source.mark_handled(item.origin, item.last_offset)
            return
        keys = [(o.partition, o.offset) for o in item.origins if o is not None]  # one a row
        # Recorded before the offer: a full batch is learned inside it.
        self._arrival_ms.update(zip(keys, arrival.timestamps_ms, strict=False))
        held_out = self.session.offer_batch(item)
        if held_out:  # diverted to the probe: never learned
            self.metrics.samples.labels("held_out").inc(len(held_out))
            for row in held_out:
                self._arrival_ms.pop(keys[row], None)
        last = item.origins[-1] if item.origins else None
        if last is not None:
            self.source.mark_handled(last)

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
        """Make dead letters durable, save the state, commit (`Checkpoints.checkpoint`)."""
        return self.checkpoints.checkpoint(self.source, (self.dead_letters, self.quarantine_sink))

    def _side_sink(self, topic: str) -> DeadLetterSink:
        """A sink for dead letters or quarantined samples, its topic created if missing."""
        kafka = self.config.kafka
        settings = kafka_settings(self.config)
        partitions = ensure_topic(
            settings, topic, kafka.side_topic_partitions, kafka.side_topic_replication, kafka.topic
        )
        return DeadLetterSink(settings, topic, partitions)

    def predict_proba(self, features: np.ndarray) -> tuple[np.ndarray, int]:
        """Class probabilities `[N, C]` from the live model and its version (updates)."""
        with self.model_lock:
            return self.learner.predict_proba(features), self.learner.updates

    def report(self, wall_seconds: float) -> dict[str, Any]:
        recent = self.exporter.latencies_ms
        latencies = np.array(recent) if recent else np.zeros(1)
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
        now_ms = time.time() * 1000
        latencies = []
        for origin in batch.origins:
            if origin is not None:
                arrived = self._arrival_ms.pop((origin.partition, origin.offset), None)
                if arrived is not None:
                    latencies.append(now_ms - arrived)
        self.exporter.learned(self.session, update_seconds, latencies)
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

    def _export_lag(self, lag: dict[int, int] | None = None) -> None:
        """Export `lag` (the prefetch thread's), else the source's now."""
        self.exporter.lag(self.source.lag() if lag is None else lag)

    def _evaluated(self, session: LearningSession) -> None:
        self.exporter.evaluated(session)

    def _checkpoint_due(self, now: float) -> bool:
        return self.checkpoints.due(now)

    def _idle_enough(
        self,
        idle_seconds: float,
        lag: dict[int, int] | None = None,
        assigned: list[int] | None = None,
    ) -> bool:
        """`until_idle` seconds without a message while partitions are assigned, no lag.

        `lag` and `assigned`: as the prefetch thread saw them, else the source's now.
        """
        limit = self.config.until_idle
        if limit is None or idle_seconds < limit:
            return False
        lag = self.source.lag() if lag is None else lag
        assigned = self.source.assignment() if assigned is None else assigned
        # Caught up: every assigned partition's lag is known (fetched) and exactly 0. Not
        # the sum: a partition past its end (negative lag) must not cancel another's.
        caught_up = bool(assigned) and lag.keys() >= set(assigned) and not any(lag.values())
        return caught_up or idle_seconds >= 3 * limit
