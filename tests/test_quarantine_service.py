"""`streamcl demo` on a noisy stream: quarantine counters reach a real Prometheus and
suspect samples reach the quarantine topic of the real broker, reason in headers."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from streamcl.deploy.cli.demo import run_demo
from streamcl.deploy.devbroker.tansu import EmbeddedBroker, free_port
from streamcl.deploy.runtime.config import LearnerConfig
from streamcl.ingest.codec import decode
from streamcl.ingest.kafka import QUARANTINE_SUFFIX
from streamcl.ingest.schema import Sample, StreamSpec
from tests.brokers import unique_topic
from tests.prometheus import ALERTS, PrometheusServer, require_prometheus
from tests.service_helpers import read_topic_records, wait_until

SPEC = StreamSpec((8, 8), "uint8", 10)


def test_noisy_demo_quarantines_into_prometheus_and_the_quarantine_topic(
    memory_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    require_prometheus()
    port = free_port()
    topic = unique_topic("demo-noisy")
    learner = LearnerConfig(
        hidden=(64,),
        memory=200,
        device="cpu",
        noise={
            "knn": True,
            "warmup": 200,
            "loss_window": 300,
            "min_class_samples": 20,
            "knn_window": 300,
        },
        quarantine={"recheck_after": 150},
    )
    result: dict[str, Any] = {}
    with PrometheusServer([f"127.0.0.1:{port}"], rule_files=[ALERTS]) as prometheus:
        demo = threading.Thread(
            target=lambda: result.update(
                run_demo(
                    tmp_path,
                    learner,
                    dataset="digits",
                    rate=100,  # ~13 s of stream: Prometheus scrapes it while it flows
                    http_port=port,
                    until_idle=10.0,  # a busy machine can take 20 s to join the group
                    progress=False,
                    label_noise=0.4,
                    broker=memory_broker,
                    topic=topic,
                )
            ),
            daemon=True,
        )
        demo.start()
        # The demo builds its stream and starts the service first: slow on a busy machine.
        wait_until(prometheus.targets_up, 120, "Prometheus to scrape the demo")
        quarantined = prometheus.wait_for('streamcl_samples_total{outcome="quarantined"} > 0', 60)
        assert float(quarantined[0]["value"][1]) > 0
        decided = prometheus.wait_for(
            'sum(streamcl_quarantine_decisions_total{decision=~"readmitted|rejected_noisy"}) > 0',
            60,
        )
        assert float(decided[0]["value"][1]) > 0
        assert prometheus.query("streamcl_quarantine_items")
        demo.join(120)
    assert not demo.is_alive(), "the demo did not finish"
    report = result
    assert report["accounting_holds"]
    assert report["samples_quarantined_total"] > 0
    # Ground truth from the stream's sidecar: most of what was quarantined was corrupted.
    assert report["filter"]["quarantined_precision"] > 0.5

    messages = read_topic_records(memory_broker, topic + QUARANTINE_SUFFIX)
    assert len(messages) == report["samples_quarantined_total"]
    offsets = set()
    for message in messages:
        payload, headers = message.value, {k: v.decode() for k, v in message.headers}
        assert headers["streamcl-reason"] in ("suspect_label_knn", "suspect_label_small-loss")
        assert headers["source-topic"] == topic
        offsets.add(int(headers["source-offset"]))
        assert isinstance(decode(payload, SPEC), Sample)  # the sample, re-encoded whole
    assert len(offsets) == len(messages)
