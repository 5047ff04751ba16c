"""Kafka as its users run it: compressed topics, unreadable batches, faithful dead letters.

Every test shares this module's one embedded broker (`memory_broker`), each on its own topic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from deploy.broker import EmbeddedBroker
from deploy.serve import run_service
from ingest.codec import encode
from ingest.datasets import load_digits
from ingest.schema import Sample
from tests.brokers import memory_broker, unique_topic  # noqa: F401
from tests.service_helpers import learned_offsets, service_config, wait_until

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


def produce(broker: EmbeddedBroker, topic: str, payloads: list[bytes], **producer: Any) -> None:
    """Send `payloads` as few batches (one linger window) and wait for the broker's ack."""
    client = KafkaProducer(
        bootstrap_servers=broker.bootstrap_servers, linger_ms=200, acks="all", **producer
    )
    try:
        for payload in payloads:
            client.send(topic, payload)
        client.flush(timeout=10)
    finally:
        client.close(timeout=5)


def read_all(broker: EmbeddedBroker, topic: str) -> list[Any]:
    """Every record of partition 0 of `topic`, from the beginning (headers, key, timestamp)."""
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, enable_auto_commit=False)
    try:
        wait_until(lambda: bool(consumer.partitions_for_topic(topic)), 10, f"topic {topic}")
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        out: list[Any] = []
        idle = 0
        while idle < 4:
            batches = consumer.poll(timeout_ms=500)
            idle = 0 if batches else idle + 1
            for records in batches.values():
                out.extend(records)
        return sorted(out, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()


@pytest.mark.parametrize("codec", [None, "gzip", "snappy", "lz4", "zstd"])
def test_every_codec_is_learned_end_to_end(
    memory_broker: EmbeddedBroker,  # noqa: F811
    tmp_path: Path,
    codec: str | None,
) -> None:
    topic = unique_topic(f"codec-{codec or 'none'}")
    memory_broker.create_topic(topic)
    produce(memory_broker, topic, digit_payloads(), compression_type=codec)

    config = service_config(memory_broker, topic, tmp_path, until_idle=1.5, learner=PLAIN_LEARNER)
    report = run_service(config)

    assert report["samples_seen"] == STREAM
    assert report["samples_learned"] == STREAM
    assert report["samples_rejected"] == 0
    assert set(learned_offsets(tmp_path / "audit.jsonl")) == {(0, o) for o in range(STREAM)}
    assert report["committed_offsets"] == {f"{topic}/0": STREAM}
