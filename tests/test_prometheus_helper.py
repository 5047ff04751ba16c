"""The real-Prometheus helper, and the dashboard and alerts evaluated by a real Prometheus."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from streamcl.deploy.devbroker.tansu import free_port
from streamcl.deploy.runtime.metrics import ServiceMetrics, record_memory
from tests.prometheus import (
    ALERTS,
    PrometheusError,
    PrometheusServer,
    dashboard_exprs,
    finite_values,
    render_grafana_expr,
    require_prometheus,
)


@contextmanager
def exporter(registry: CollectorRegistry) -> Iterator[str]:
    """Serve `registry` on a free loopback port; yields the scrape target host:port."""
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def value_is(expected: float) -> Callable[[list[dict[str, Any]]], bool]:
    def check(result: list[dict[str, Any]]) -> bool:
        return len(result) == 1 and float(result[0]["value"][1]) == expected

    check.__name__ = f"value == {expected}"
    return check


def test_query_sees_the_exporters_counter_as_it_changes() -> None:
    require_prometheus()
    registry = CollectorRegistry()
    events = Counter("helper_events", "Events counted by the test.", registry=registry)
    events.inc(3)
    with exporter(registry) as target, PrometheusServer([target]) as prometheus:
        # The first scrape comes ~1-5 s after start: poll, never sleep blindly.
        result = prometheus.wait_for("helper_events_total", 10, value_is(3))
        assert result[0]["metric"] == {
            "__name__": "helper_events_total",
            "instance": target,
            "job": "streamcl",
        }
        assert prometheus.targets_up()
        events.inc(2)
        prometheus.wait_for("helper_events_total", 10, value_is(5))
        with pytest.raises(PrometheusError, match=r"bad_data: .*parse error"):
            prometheus.query("rate(helper_events_total[")


def test_server_rejects_non_loopback_targets_and_relative_rule_files() -> None:
    with pytest.raises(ValueError, match=re.escape("loopback, got 'example.com:80'")):
        PrometheusServer(["example.com:80"])
    with pytest.raises(ValueError, match=re.escape("absolute, got 'alerts.yml'")):
        PrometheusServer(["127.0.0.1:9"], rule_files=["alerts.yml"])


def populated_metrics(registry: CollectorRegistry, rank: int = 0, world: int = 1) -> ServiceMetrics:
    """Every ServiceMetrics series set once, as a learner (rank) that has run a while would."""
    metrics = ServiceMetrics(registry, rank, world)
    metrics.track_device_memory(lambda: 2.0**20)
    for partition, lag in (("0", 12), ("1", 30)):
        metrics.lag.labels(partition).set(lag)
    metrics.average_accuracy.set(0.8)
    metrics.average_forgetting.set(0.15)
    metrics.backward_transfer.set(-0.15)
    metrics.prequential.set(0.9)
    metrics.set_groups([0.7, 0.9], [0.2, None])
    metrics.memory_items.set(800)
    metrics.memory_capacity.set(1000)
    metrics.memory_bytes.set(800 * 784)
    bytes_by_part = {"features": 800 * 784, "embeddings": 800 * 256, "index": 0, "condensed": 0}
    record_memory(metrics, {"backend": "flat", "indexed_items": 800, "bytes": bytes_by_part})
    metrics.probe_items.set(40)
    metrics.checkpointed(0.05)
    metrics.track_checkpoint_age(lambda: 12.0)
    metrics.checkpoint_age_limit.set(900)
    metrics.checkpoint_bytes.set(3_500_000)
    return metrics


def feed(metrics: ServiceMetrics, stop: threading.Event) -> None:
    """Keep counters and histograms moving so rates and quantiles are finite."""
    while not stop.wait(0.1):
        metrics.samples.labels("learned").inc(20)
        for outcome in ("quarantined", "rejected", "held_out"):
            metrics.samples.labels(outcome).inc()
        metrics.rejected.labels("wrong_shape").inc()
        metrics.updates.inc()
        metrics.update_seconds.observe(0.004)
        metrics.step_seconds.inc(0.004)
        metrics.communication_seconds.inc(0.001)
        metrics.arrival_to_update.observe(0.2)
        metrics.evaluations.inc()
        metrics.drift_events.inc()
        metrics.checkpointed(0.05)
        metrics.checkpoint_failures.inc()
        metrics.model_version.inc()
        metrics.last_poll.set_to_current_time()


def both_ranks(result: list[dict[str, Any]]) -> bool:
    """Finite, one series per rank (the `by (rank)` panels)."""
    return finite_values(result) and {s["metric"]["rank"] for s in result} == {"0", "1"}


def test_every_dashboard_query_and_alert_rule_works_on_the_services_metrics() -> None:
    """Two learner ranks, two targets: every query is finite, the rank panels show both."""
    require_prometheus()
    registries = [CollectorRegistry(), CollectorRegistry()]
    ranks = [populated_metrics(registry, rank, 2) for rank, registry in enumerate(registries)]
    stop = threading.Event()
    feeders = [threading.Thread(target=feed, args=(m, stop), daemon=True) for m in ranks]
    for feeder in feeders:
        feeder.start()
    try:
        with (
            exporter(registries[0]) as rank_0,
            exporter(registries[1]) as rank_1,
            PrometheusServer([rank_0, rank_1], rule_files=[ALERTS]) as prometheus,
        ):
            for where, expr in dashboard_exprs():
                check = both_ranks if "by (rank)" in expr else finite_values
                try:
                    prometheus.wait_for(render_grafana_expr(expr), 15, check)
                except (TimeoutError, PrometheusError) as err:
                    pytest.fail(f"dashboard panel {where}: {err}")
            # The group's accuracy comes from rank 0 alone.
            accuracy = prometheus.query("streamcl_average_accuracy_ratio")
            assert [s["metric"]["instance"] for s in accuracy] == [rank_0]

            def evaluated(_: object) -> bool:
                rules = prometheus.rules()
                return bool(rules) and all(r["health"] != "unknown" for r in rules)

            prometheus.wait_for("vector(1)", 10, evaluated)
            rules = prometheus.rules()
            assert {r["name"] for r in rules} == {
                "StreamclForgettingHigh",
                "StreamclAccuracyDrop",
                "StreamclLagGrowing",
                "StreamclRejectionSurge",
                "StreamclLearnerStalled",
                "StreamclCheckpointsFailing",
                "StreamclCheckpointStale",
                "StreamclQuarantineSurge",
            }
            broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
            assert broken == {}
    finally:
        stop.set()
        for feeder in feeders:
            feeder.join(timeout=5)
