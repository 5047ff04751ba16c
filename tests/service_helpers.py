"""Helpers for tests that run the service against a real broker."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from streamcl.deploy.devbroker.tansu import EmbeddedBroker, free_port
from streamcl.deploy.runtime.config import ServiceConfig
from streamcl.deploy.runtime.serve import run_service
from streamcl.ingest.codec import encode
from streamcl.ingest.datasets import load_digits
from streamcl.ingest.schema import Sample
from tests.brokers import FAST_GROUP


def service_config(
    broker: EmbeddedBroker, topic: str, workdir: Path, **extra: Any
) -> ServiceConfig:
    """A service on `topic` with short group timeouts and everything under `workdir`."""
    raw: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": broker.bootstrap_servers,
            "topic": topic,
            "group_id": f"g-{topic}",
            "consumer": dict(FAST_GROUP),
            "poll_timeout_ms": 100,
        },
        "spec": {"feature_shape": [8, 8], "dtype": "uint8", "num_classes": 10},
        "learner": {"strategy": "er", "memory": 200, "device": "cpu"},
        "checkpoint": {"dir": str(workdir / "checkpoints"), "every_updates": 20},
        "snapshot": {"dir": str(workdir / "snapshots"), "every_updates": 50},
        "http": {"port": free_port()},
        "probe": {"fraction": 0},  # tests that want a diverted probe turn it on
        "audit_log": str(workdir / "audit.jsonl"),
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return ServiceConfig.model_validate(raw)


def learned_offsets(audit_log: Path) -> Counter[tuple[int, int]]:
    """How many times each (partition, offset) was learned, from the audit log."""
    counts: Counter[tuple[int, int]] = Counter()
    if not audit_log.exists():
        return counts
    for line in audit_log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short by kill -9
        counts.update((p, o) for p, o in entry["learned"])
    return counts


def metric(base: str, name: str) -> float:
    """One sample's value from the service's /metrics page."""
    with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    raise AssertionError(f"{name} not exported")


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


class ServiceThread:
    """Run `run_service` in a thread; `stop()` returns its report."""

    def __init__(self, config: ServiceConfig):
        self.stop_event = threading.Event()
        self.report: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(config,), daemon=True)
        self.thread.start()

    def _run(self, config: ServiceConfig) -> None:
        try:
            self.report = run_service(config, self.stop_event)
        except BaseException as err:  # surfaced by stop()
            self.error = err

    def stop(self, timeout_s: float = 30.0) -> dict[str, Any]:
        self.stop_event.set()
        self.thread.join(timeout_s)
        if self.error is not None:
            raise self.error
        assert self.report is not None, "service thread did not finish"
        return self.report


UNTIL_IDLE = 3.0
"""Seconds without messages before a test's service stops; it also stops after 3x this
without an assignment, so it must leave room for a slow group join on a loaded machine."""
STREAM = 40
"""Samples per topic: enough for several batches, few enough to take seconds."""
PLAIN_LEARNER = {"noise": {"knn": False, "small_loss": False}}
"""No noise filter, so every valid sample must be learned (none held back as a suspect)."""


def digit_payloads(n: int = STREAM, offset: int = 0) -> list[bytes]:
    data = load_digits()
    return [
        encode(Sample(data.train_x[i], int(data.train_y[i]), sample_id=i))
        for i in range(offset, offset + n)
    ]


def produce(
    broker: EmbeddedBroker,
    topic: str,
    payloads: list[bytes],
    partition: int | None = None,
    **producer: Any,
) -> None:
    """Send `payloads` as few batches (one linger window) and wait for the broker's ack."""
    client = KafkaProducer(
        bootstrap_servers=broker.bootstrap_servers, linger_ms=200, acks="all", **producer
    )
    try:
        for payload in payloads:
            client.send(topic, payload, partition=partition)
        client.flush(timeout=10)
    finally:
        client.close(timeout=5)


def read_topic_records(broker: EmbeddedBroker, topic: str) -> list[ConsumerRecord]:
    """Every record of every partition of `topic`, from the beginning (headers, key, timestamp)."""
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, enable_auto_commit=False)
    try:
        wait_until(lambda: bool(consumer.partitions_for_topic(topic)), 10, f"topic {topic}")
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        out: list[ConsumerRecord] = []
        idle = 0
        while idle < 4:
            batches = consumer.poll(timeout_ms=500)
            idle = 0 if batches else idle + 1
            for records in batches.values():
                out.extend(records)
        return sorted(out, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()
