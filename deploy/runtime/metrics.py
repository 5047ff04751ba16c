"""Prometheus metrics of the learner service, created on an injected registry.

Names follow Prometheus conventions: `streamcl_<thing>_<unit>`, base units, `_total`
for counters. Labels are bounded: outcome and reason come from fixed sets, partition
and group from the topic's partitions and the stream's groups (capped).

Ranks: every learner process (one rank under torchrun, or the single-process service as
rank 0 of 1) serves its own endpoint, so Prometheus tells ranks apart by target. The info
series `streamcl_rank_info{rank, world_size}` puts the rank on any per-process series by
a join, e.g. `rate(streamcl_samples_total[1m]) * on (job, instance) group_left (rank)
streamcl_rank_info`; the series themselves keep one label set in every mode. Accuracy and
forgetting are the group's (every rank holds the same model): only rank 0 exports them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from streamcl.ingest.codec import REJECT_REASONS
from streamcl.ingest.kafka import UNREADABLE
from streamcl.ingest.offsets import OUT_OF_RANGE
from streamcl.learner.checkpoint import CHECKPOINT_LOAD_FAILURES

OUTCOMES = ("learned", "quarantined", "rejected", "held_out")
"""What became of a message when it arrived; a quarantined one is later re-admitted
(learned) or rejected as noisy (QUARANTINE_DECISIONS), or is still in quarantine."""
QUARANTINE_DECISIONS = ("readmitted", "rejected_noisy")
MAX_GROUP_LABELS = 64
"""Per-group series beyond this many groups are not exported (bounded cardinality)."""
UPDATE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServiceMetrics:
    """Every metric the service exports; methods are called by the service's loop."""

    def __init__(self, registry: CollectorRegistry, rank: int = 0, world_size: int = 1):
        self.registry = registry
        r = registry
        # Ranks other than 0 keep these gauges off their endpoint (a private registry),
        # so a query over all ranks sees one global accuracy, not N copies.
        evaluation = r if rank == 0 else CollectorRegistry()
        self.rank_info = Gauge(
            "streamcl_rank_info",
            "1, labelled with this learner process's rank and the group's size (single "
            "process: rank 0 of 1); join on (job, instance) to get per-rank series.",
            ["rank", "world_size"],
            registry=r,
        )
        self.rank_info.labels(str(rank), str(world_size)).set(1)
        self.step_seconds = Counter(
            "streamcl_step_seconds",
            "Wall time in learning steps: this rank's updates and, with several ranks, the "
            "other ranks' steps it applies, gradient all-reduces included.",
            registry=r,
        )
        self.communication_seconds = Counter(
            "streamcl_communication_seconds",
            "Of streamcl_step_seconds, the time in gradient all-reduces (waiting for slower "
            "ranks included); 0 for a single process.",
            registry=r,
        )
        self.samples = Counter(
            "streamcl_samples", "Messages consumed, by outcome.", ["outcome"], registry=r
        )
        self.rejected = Counter(
            "streamcl_rejected_samples",
            "Messages rejected to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.unreadable_batches = Counter(
            "streamcl_unreadable_batches",
            "Record batches the Kafka client could not decode (dead-lettered and skipped, or "
            "the service stopped on them).",
            registry=r,
        )
        self.updates = Counter("streamcl_updates", "Optimizer steps taken.", registry=r)
        self.update_seconds = Histogram(
            "streamcl_update_duration_seconds",
            "Wall time of one learning update (all its steps).",
            buckets=UPDATE_BUCKETS,
            registry=r,
        )
        self.arrival_to_update = Histogram(
            "streamcl_arrival_to_update_seconds",
            "Time from a message's Kafka timestamp to the update that learned it.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lag = Gauge(
            "streamcl_consumer_lag_messages",
            "Messages behind the partition's high-water mark; negative: the position is "
            "past the log end (topic recreated or truncated).",
            ["partition"],
            registry=r,
        )
        self.average_accuracy = Gauge(
            "streamcl_average_accuracy_ratio",
            "Mean probe accuracy over groups seen so far.",
            registry=evaluation,
        )
        self.average_forgetting = Gauge(
            "streamcl_average_forgetting_ratio",
            "Mean forgetting over finished groups.",
            registry=evaluation,
        )
        self.backward_transfer = Gauge(
            "streamcl_backward_transfer_ratio",
            "Backward transfer (negative: forgetting).",
            registry=evaluation,
        )
        self.prequential = Gauge(
            "streamcl_prequential_accuracy_ratio",
            "Test-then-train accuracy over the recent window (this rank's arrivals).",
            registry=r,
        )
        self.group_accuracy = Gauge(
            "streamcl_group_accuracy_ratio",
            "Probe accuracy per group (task or class).",
            ["group"],
            registry=evaluation,
        )
        self.group_forgetting = Gauge(
            "streamcl_group_forgetting_ratio",
            "Forgetting per finished group.",
            ["group"],
            registry=evaluation,
        )
        self.evaluations = Counter("streamcl_evaluations", "Probe evaluations run.", registry=r)
        self.memory_items = Gauge(
            "streamcl_memory_items", "Exemplars in replay memory.", registry=r
        )
        self.memory_capacity = Gauge(
            "streamcl_memory_capacity_items", "Replay memory capacity.", registry=r
        )
        self.memory_bytes = Gauge(
            "streamcl_memory_bytes", "Bytes held by replay memory.", registry=r
        )
        self.memory_part_bytes = Gauge(
            "streamcl_memory_part_bytes",
            "Bytes of replay memory by part: features, embeddings, index, condensed.",
            ["part"],
            registry=r,
        )
        self.memory_indexed_items = Gauge(
            "streamcl_memory_indexed_items",
            "Replay memory items in its embedding index (non-finite embeddings are not).",
            registry=r,
        )
        self.memory_index = Gauge(
            "streamcl_memory_index_info",
            "The replay memory's index backend (1 for the one in use; none without index).",
            ["backend"],
            registry=r,
        )
        self.probe_items = Gauge(
            "streamcl_probe_items", "Held-out probe samples diverted from the stream.", registry=r
        )
        self.drift_events = Counter(
            "streamcl_drift_events", "Task boundaries or drifts detected.", registry=r
        )
        self.checkpoints = Counter("streamcl_checkpoints", "Checkpoints written.", registry=r)
        self.checkpoint_failures = Counter(
            "streamcl_checkpoint_failures", "Checkpoints postponed or failed.", registry=r
        )
        self.checkpoint_bytes = Gauge(
            "streamcl_checkpoint_bytes",
            "Size of the newest checkpoint; its volume must hold checkpoint.keep + 1 of them.",
            registry=r,
        )
        self.checkpoint_age_limit = Gauge(
            "streamcl_checkpoint_age_limit_seconds",
            "checkpoint.max_age_seconds: alert when streamcl_checkpoint_age_seconds exceeds it.",
            registry=r,
        )
        self.offset_out_of_range = Counter(
            "streamcl_offset_out_of_range",
            "Partitions whose checkpoint offset (or live position) lay outside the log, by "
            "where: before its start or past its end.",
            ["reason"],
            registry=r,
        )
        self.checkpoint_seconds = Histogram(
            "streamcl_checkpoint_duration_seconds",
            "Time to write a checkpoint and commit.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.last_checkpoint = Gauge(
            "streamcl_last_checkpoint_timestamp_seconds",
            "Unix time of the last successful checkpoint.",
            registry=r,
        )
        self.model_version = Gauge(
            "streamcl_model_version", "Updates behind the live model.", registry=r
        )
        self.last_poll = Gauge(
            "streamcl_last_poll_timestamp_seconds",
            "Unix time the loop last polled Kafka.",
            registry=r,
        )
        self.quarantine_decisions = Counter(
            "streamcl_quarantine_decisions",
            "Quarantined samples re-examined: re-admitted (learned) or rejected as noisy.",
            ["decision"],
            registry=r,
        )
        self.quarantine_items = Gauge(
            "streamcl_quarantine_items",
            "Suspect-label samples waiting in quarantine. Messages consumed = learned + "
            "quarantined + rejected + held out (outcomes); quarantined = re-admitted + "
            "rejected as noisy + still in quarantine.",
            registry=r,
        )
        self.checkpoint_load_failures = Counter(
            "streamcl_checkpoint_load_failures",
            "Checkpoints skipped at start-up (unreadable or failing their checksum), by reason.",
            ["reason"],
            registry=r,
        )
        self.http_busy = Counter(
            "streamcl_http_busy_responses",
            "HTTP requests answered 503 because every worker and queue slot was taken.",
            registry=r,
        )
        # process_* series (start time, memory, CPU) from the standard collectors.
        ProcessCollector(registry=r)
        for outcome in OUTCOMES:
            self.samples.labels(outcome)
        for reason in (*REJECT_REASONS, "corrupt_frame", UNREADABLE):
            self.rejected.labels(reason)
        for decision in QUARANTINE_DECISIONS:
            self.quarantine_decisions.labels(decision)
        for reason in CHECKPOINT_LOAD_FAILURES:
            self.checkpoint_load_failures.labels(reason)
        for reason in OUT_OF_RANGE:
            self.offset_out_of_range.labels(reason)

    def track_checkpoint_age(self, read_seconds: Callable[[], float]) -> None:
        """Export the age of the learning not yet in a checkpoint (read at each scrape)."""
        gauge = Gauge(
            "streamcl_checkpoint_age_seconds",
            "Seconds since the last durable checkpoint while updates since it are unsaved; "
            "0 when everything learned is checkpointed.",
            registry=self.registry,
        )
        gauge.set_function(read_seconds)

    def track_device_memory(self, read_bytes: Callable[[], float]) -> None:
        """Export accelerator memory in use (only called when the learner is on a GPU)."""
        gauge = Gauge(
            "streamcl_device_memory_bytes", "Accelerator memory allocated.", registry=self.registry
        )
        gauge.set_function(read_bytes)

    def checkpointed(self, seconds: float) -> None:
        self.checkpoints.inc()
        self.checkpoint_seconds.observe(seconds)
        self.last_checkpoint.set(time.time())

    def set_groups(self, accuracy: list[float], forgetting: list[float | None]) -> None:
        for group, accuracy_value in enumerate(accuracy[:MAX_GROUP_LABELS]):
            self.group_accuracy.labels(str(group)).set(accuracy_value)
        for group, forgetting_value in enumerate(forgetting[:MAX_GROUP_LABELS]):
            if forgetting_value is not None:
                self.group_forgetting.labels(str(group)).set(forgetting_value)


def record_memory(metrics: ServiceMetrics, usage: dict[str, Any]) -> None:
    """Export a `ReplayBuffer.usage()`: index backend, indexed items, bytes by part."""
    metrics.memory_index.labels(usage["backend"]).set(1)  # fixed for a memory's lifetime
    metrics.memory_indexed_items.set(usage["indexed_items"])
    for part, size in usage["bytes"].items():
        metrics.memory_part_bytes.labels(part).set(size)


def record_report(metrics: ServiceMetrics, report: dict[str, Any]) -> None:
    """Load a finished run's report into `metrics` (for `replay`'s batch evaluations)."""
    metrics.samples.labels("learned").inc(report["samples_admitted"])
    metrics.samples.labels("quarantined").inc(report["samples_quarantined_total"])
    metrics.quarantine_decisions.labels("readmitted").inc(report["samples_readmitted"])
    metrics.quarantine_decisions.labels("rejected_noisy").inc(report["samples_rejected_noisy"])
    metrics.quarantine_items.set(report["samples_quarantined"])
    metrics.samples.labels("held_out").inc(report.get("samples_held_out", 0))
    for reason, count in report["rejected_by_reason"].items():
        metrics.rejected.labels(reason).inc(count)
        metrics.samples.labels("rejected").inc(count)
    metrics.rejected.labels("corrupt_frame").inc(report.get("corrupt_frames", 0))
    metrics.updates.inc(report["updates"])
    metrics.model_version.set(report["updates"])
    metrics.evaluations.inc(len(report["evaluation_points"]))
    undefined = float("nan")  # null in the report (its null_reasons say why)
    metrics.average_accuracy.set(_or(report["final_average_accuracy"], undefined))
    metrics.average_forgetting.set(_or(report["average_forgetting"], undefined))
    metrics.backward_transfer.set(_or(report["backward_transfer"], undefined))
    metrics.prequential.set(report["prequential_accuracy"])
    if report["accuracy_matrix"]:
        metrics.set_groups(report["accuracy_matrix"][-1], report["per_group_forgetting"])
    if "memory" in report:
        metrics.memory_items.set(report["memory"]["items"])
        metrics.memory_bytes.set(sum(report["memory"]["bytes"].values()))
        record_memory(metrics, report["memory"])


def _or(value: float | None, default: float) -> float:
    return default if value is None else value
