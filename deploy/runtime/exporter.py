"""The service's metrics glue: keeps Prometheus' view of learner, session and source current.

`ServiceMetrics` (metrics.py) defines the series; this module decides what goes into
them after each update, evaluation, restore and poll.
"""

from __future__ import annotations

import logging
from collections import deque

import numpy as np
import torch

from streamcl.deploy.runtime.metrics import ServiceMetrics, record_memory
from streamcl.deploy.runtime.session import FilterAccounting, LearningSession
from streamcl.learner.loop import OnlineLearner
from streamcl.memory.buffer import NO_MEMORY_USAGE, ReplayBuffer

log = logging.getLogger(__name__)
REPORTED_LATENCIES = 100_000
"""Arrival-to-update latencies the final report's p50/p99 are taken over (the latest)."""
MEMORY_USAGE_EVERY = 100
"""Updates between exports of the memory's usage (index counts, bytes by part), besides
every evaluation and restore: counting the index on every update cost the step time."""


class MetricsExporter:
    """Turns what the service did into metric updates; holds the deltas between exports."""

    def __init__(
        self, metrics: ServiceMetrics, learner: OnlineLearner, memory: ReplayBuffer | None
    ):
        self.metrics = metrics
        self.learner = learner
        self.memory = memory
        # The report's percentiles: the latest arrivals (Prometheus' histogram has them all).
        self.latencies_ms: deque[float] = deque(maxlen=REPORTED_LATENCIES)
        self._filter_counts = dict.fromkeys(FilterAccounting.KEYS, 0)
        self._drift_events_seen = 0
        self._lag_partitions: set[int] = set()
        self._past_end: set[int] = set()
        self._usage_at = 0  # learner.updates when the memory's usage was last exported
        if memory is not None:
            metrics.memory_capacity.set(memory.capacity)
        # Without a memory (naive, packnet) its series still exist, at zero with backend "none".
        record_memory(metrics, memory.usage() if memory is not None else NO_MEMORY_USAGE)
        if learner.device.type == "cuda":
            device = learner.device
            metrics.track_device_memory(lambda: torch.cuda.memory_allocated(device))

    def restored(self, session: LearningSession) -> None:
        """A checkpoint was loaded: counters continue from it, not from zero."""
        self._filter_counts = dict(session.filtering.counts)
        self.metrics.quarantine_items.set(session.in_quarantine)
        self.metrics.model_version.set(self.learner.updates)
        self._memory_usage()
        if self.learner.detector is not None:
            self._drift_events_seen = self.learner.detector.event_count
        if session.matrix.rows:
            self.evaluated(session)

    def learned(
        self, session: LearningSession, update_seconds: float, latencies_ms: list[float]
    ) -> None:
        """One update: its outcome counters, timings and the arrival-to-update latencies."""
        m = self.metrics
        detector = self.learner.detector
        if detector is not None and detector.event_count > self._drift_events_seen:
            m.drift_events.inc(detector.event_count - self._drift_events_seen)
            self._drift_events_seen = detector.event_count
        self._filtering(session)
        m.updates.inc(self.learner.steps_per_batch)
        m.update_seconds.observe(update_seconds)
        m.step_seconds.inc(update_seconds)
        m.model_version.set(self.learner.updates)
        m.prequential.set(session.prequential.get_windowed())
        if self.memory is not None:
            m.memory_items.set(len(self.memory))
            if self.learner.updates - self._usage_at >= MEMORY_USAGE_EVERY:
                self._memory_usage()
        for latency in latencies_ms:
            m.arrival_to_update.observe(max(0.0, latency) / 1000)
            self.latencies_ms.append(latency)

    def evaluated(self, session: LearningSession) -> None:
        """A new row of the accuracy matrix: averages, forgetting and per-group gauges."""
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
        self._memory_usage()

    def _memory_usage(self) -> None:
        """Export the memory's bytes and index usage (`ReplayBuffer.usage`)."""
        if self.memory is not None:
            self.metrics.memory_bytes.set(self.memory.nbytes)
            record_memory(self.metrics, self.memory.usage())
        self._usage_at = self.learner.updates

    def lag(self, lag: dict[int, int]) -> None:
        """Per-partition lag gauges; a partition past its log's end is warned about once."""
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

    def _filtering(self, session: LearningSession) -> None:
        """Outcome counters by the filter's decisions since the last export; quarantine size."""
        m = self.metrics
        counts = session.filtering.counts
        delta = {k: counts[k] - self._filter_counts.get(k, 0) for k in counts}
        self._filter_counts = dict(counts)
        m.samples.labels("learned").inc(delta["admitted"])
        m.samples.labels("quarantined").inc(delta["quarantined"])
        m.quarantine_decisions.labels("readmitted").inc(delta["readmitted"])
        m.quarantine_decisions.labels("rejected_noisy").inc(delta["rejected_noisy"])
        m.quarantine_items.set(session.in_quarantine)
