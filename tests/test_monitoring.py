"""A real Prometheus scrapes a running `streamcl serve`; every dashboard and alert query
is evaluated against it. Needs Debian's `prometheus` (installed by tests/run.sh)."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from streamcl.deploy.devbroker.tansu import EmbeddedBroker
from streamcl.deploy.runtime.transfer import publish_stream
from streamcl.ingest.codec import encode
from streamcl.ingest.kafka import KafkaSettings, Publisher
from streamcl.ingest.schema import Sample
from tests.brokers import unique_topic
from tests.prometheus import (
    ALERTS,
    PrometheusServer,
    alert_rules,
    dashboard_exprs,
    finite_values,
    render_grafana_expr,
    require_prometheus,
)
from tests.service_helpers import ServiceThread, learned_offsets, service_config, wait_until

# Queries that must come back empty in this run, and why; checked to BE empty.
INTENTIONALLY_EMPTY = {
    "streamcl_device_memory_bytes": "exported only when the learner runs on a GPU",
    "StreamclAccuracyDrop": "compares with 1 h ago: this Prometheus is seconds old",
    "StreamclLagGrowing": "the learner keeps up: lag is not growing",
    "StreamclLearnerStalled": "the learner is learning and polling",
    "StreamclCheckpointsFailing": "checkpoints succeed",
    "StreamclCheckpointStale": "checkpoints succeed: unsaved learning stays young",
    "StreamclQuarantineSurge": "compares with the hour before: this Prometheus is seconds old",
    "annotation 'Drift events'": "no boundary detector runs in this service",
}


BAD_LABELS = 200


def value(result: list[dict]) -> float:
    return float(result[0]["value"][1])


def send_bad_labels(settings: KafkaSettings, topic: str, count: int, rate: float) -> None:
    publisher = Publisher(settings)
    for _ in range(count):
        publisher.send(topic, encode(Sample(np.zeros((8, 8), np.uint8), 42)))
        publisher.flush()
        time.sleep(1 / rate)
    publisher.close()


@pytest.fixture
def monitored_service(memory_broker: EmbeddedBroker, digits_stream: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Naive fine-tuning on class-incremental digits, a diverted probe, a few bad messages."""
    require_prometheus()
    topic = unique_topic("prom")
    memory_broker.create_topic(topic)
    config = service_config(
        memory_broker,
        topic,
        tmp_path,
        learner={"strategy": "naive"},
        probe={"fraction": 0.2, "per_class": 30},
        checkpoint={"every_updates": 10},
    )
    settings = KafkaSettings(memory_broker.bootstrap_servers)
    target = f"127.0.0.1:{config.http.port}"
    with PrometheusServer([target], rule_files=[ALERTS]) as prometheus:
        service = ServiceThread(config)
        # 200 bad labels at 20/s beside 100 good samples/s: a rejection rate (~17%, and
        # still 13% of the whole stream) that Prometheus sees rise, since they arrive after
        # its first scrape, well over the surge alert's 5% however far the learner lags
        # (at 100 bad labels, 6.9% of the whole stream, a loaded machine saw it below).
        rejecter = threading.Thread(
            target=send_bad_labels, args=(settings, topic, BAD_LABELS, 20.0), daemon=True
        )
        rejecter.start()
        publisher = threading.Thread(
            target=publish_stream,
            args=(digits_stream, settings, topic),
            kwargs={"rate": 100, "progress": False},
            daemon=True,
        )
        publisher.start()
        try:
            yield prometheus, tmp_path / "audit.jsonl"
        finally:
            publisher.join(30)
            rejecter.join(30)
            service.stop()


def test_prometheus_sees_accuracy_forgetting_counters_latency_and_lag(monitored_service) -> None:  # type: ignore[no-untyped-def]
    prometheus, audit = monitored_service
    wait_until(prometheus.targets_up, 20, "Prometheus to scrape the service")
    learned = prometheus.wait_for('streamcl_samples_total{outcome="learned"} > 0', 30)
    assert value(learned) > 0
    rejected = prometheus.wait_for(
        'streamcl_rejected_samples_total{reason="label_out_of_range"}',
        30,
    )
    assert value(rejected) > 0
    lag = prometheus.wait_for('streamcl_consumer_lag_messages{partition="0"}', 30)
    assert value(lag) >= 0
    p50 = prometheus.wait_for(
        "histogram_quantile(0.5, rate(streamcl_update_duration_seconds_bucket[1m]))",
        30,
        predicate=finite_values,
    )
    assert 0 < value(p50) < 1
    arrival = prometheus.wait_for(
        "histogram_quantile(0.99, rate(streamcl_arrival_to_update_seconds_bucket[1m]))",
        30,
        predicate=finite_values,
    )
    assert 0 < value(arrival) < 60
    accuracy = prometheus.wait_for("streamcl_average_accuracy_ratio > 0", 30)
    assert 0 < value(accuracy) <= 1

    # A forgetting event is visible: without replay, the classes of the first task are
    # forgotten once the second task has been learned.
    forgetting = prometheus.wait_for("max(streamcl_group_forgetting_ratio) > 0.5", 60)
    assert value(forgetting) > 0.5
    average = prometheus.query("streamcl_average_forgetting_ratio")
    assert 0 < value(average) <= 1

    # Every dashboard panel and alert expression, while the stream still flows (the
    # publisher sends for ~13 s), so rates over the panels' short windows are defined.
    prometheus.wait_for("streamcl_checkpoints_total > 0", 30)
    assert len(learned_offsets(audit)) < 1348, "the stream ended before the queries ran"
    problems = []
    alerts = [(rule["alert"], rule["expr"]) for rule in alert_rules() if "alert" in rule]
    for name, expr in dashboard_exprs() + alerts:
        rendered = render_grafana_expr(expr)
        empty_reason = next(
            (why for key, why in INTENTIONALLY_EMPTY.items() if key == name or key in expr), None
        )
        result = prometheus.query(rendered)
        if empty_reason is not None:
            if result:
                problems.append(f"{name}: expected empty ({empty_reason}), got {result}")
        elif not result:
            problems.append(f"{name}: empty result for {rendered}")
        elif not all(math.isfinite(float(s["value"][1])) or s["value"][1] == "NaN" for s in result):
            problems.append(f"{name}: non-numeric result {result}")
    assert not problems, "\n".join(problems)
    every = prometheus.wait_for(
        f'streamcl_rejected_samples_total{{reason="label_out_of_range"}} == {BAD_LABELS}', 40
    )
    assert value(every) == BAD_LABELS
