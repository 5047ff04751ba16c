"""Consumer-group rebalances while `serve` learns: members join and leave its group."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer

from streamcl.deploy.devbroker.tansu import EmbeddedBroker
from streamcl.deploy.runtime.service import Service
from streamcl.ingest.kafka import ASSIGNORS, poll_group
from streamcl.ingest.schema import Batch
from tests.brokers import FAST_GROUP, memory_broker, unique_topic  # noqa: F401
from tests.service_helpers import ServiceThread, learned_offsets, service_config, wait_until
from tests.test_recovery import publish_in_background

DIGITS = 1348
PARTITIONS = 4


def join_and_leave(
    broker: EmbeddedBroker, group: str, topic: str, rebalance: str, audit: Path
) -> dict[int, tuple[int, int]]:
    """A plain consumer joins `group`, reads for a moment, commits nothing and leaves.

    Returns, per partition it was given: where it starts (the group's committed
    offset) and how far the service had learned there, from its audit log.
    """
    consumer = KafkaConsumer(
        bootstrap_servers=broker.bootstrap_servers,
        group_id=group,
        enable_auto_commit=False,
        partition_assignment_strategy=ASSIGNORS[rebalance],
        **FAST_GROUP,
    )
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 20
        while not consumer.assignment() and time.monotonic() < deadline:
            poll_group(consumer, 200)
        taken = {tp.partition: consumer.committed(tp) or 0 for tp in consumer.assignment()}
        learned = learned_offsets(audit)
        for _ in range(5):
            poll_group(consumer, 200)
        return {
            p: (start, 1 + max((o for q, o in learned if q == p), default=-1))
            for p, start in taken.items()
        }
    finally:
        consumer.close(autocommit=False)


@pytest.mark.parametrize("rebalance", ["cooperative", "eager"])
def test_members_joining_and_leaving_twice_neither_stop_nor_skip(
    memory_broker: EmbeddedBroker,  # noqa: F811
    digits_stream: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    rebalance: str,
) -> None:
    caplog.set_level(logging.INFO, logger="streamcl.ingest.kafka")
    topic = unique_topic("rebal")
    memory_broker.create_topic(topic, partitions=PARTITIONS)
    every_updates, batch = 20, 10
    config = service_config(
        memory_broker,
        topic,
        tmp_path,
        kafka={"rebalance": rebalance},
        checkpoint={"every_updates": every_updates},
        learner={"noise": {"knn": False, "small_loss": False}},  # every sample is learned
    )
    audit = tmp_path / "audit.jsonl"
    service = ServiceThread(config)
    wait_until(lambda: service.thread.is_alive(), 5, "the service to start")
    publisher = publish_in_background(digits_stream, memory_broker, topic, rate=120)
    try:
        wait_until(lambda: len(learned_offsets(audit)) >= 100, 60, "the service to learn")
        taken = []
        for _ in range(2):
            taken.append(
                join_and_leave(memory_broker, config.kafka.group_id, topic, rebalance, audit)
            )
            assert service.thread.is_alive(), f"serve stopped: {service.error!r}"
        publisher.join(60)
        wait_until(lambda: len(learned_offsets(audit)) >= DIGITS, 60, "every sample learned")
    finally:
        report = service.stop()

    assert all(taken), f"the joiner was given no partition: {taken}"
    for given in taken:
        for start, learned in given.values():
            # Checkpointed and committed at revocation: the joiner starts where serve
            # stopped, past all it learned there (and past its partial batch, < batch).
            assert learned <= start < learned + batch
    assert "partitions revoked" in caplog.text
    assert "partitions revoked" in caplog.text
    counts = learned_offsets(audit)
    by_partition: dict[int, list[int]] = {}
    for partition, offset in counts:
        by_partition.setdefault(partition, []).append(offset)
    assert sum(len(offsets) for offsets in by_partition.values()) == DIGITS
    for offsets in by_partition.values():
        assert sorted(offsets) == list(range(len(offsets))), "an offset was skipped"
    relearned = sum(counts.values()) - DIGITS
    rebalances = 2 * len(taken)  # each join and each leave
    assert 0 <= relearned <= rebalances * every_updates * batch
    assert report["samples_learned"] == DIGITS
    committed = {int(k.rsplit("/", 1)[1]): v for k, v in report["committed_offsets"].items()}
    assert committed == {p: len(offsets) for p, offsets in by_partition.items()}


def test_a_step_longer_than_max_poll_interval_rejoins_without_skipping(
    memory_broker: EmbeddedBroker,  # noqa: F811
    digits_stream: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    topic = unique_topic("slow")
    memory_broker.create_topic(topic, partitions=2)
    max_poll_interval_ms = 1500
    slept: list[float] = []
    learned = Service._learned

    def slow_once(self: Service, batch: Batch, update_seconds: float) -> None:
        """A stub step (think: a long evaluation) twice as long as max_poll_interval_ms."""
        learned(self, batch, update_seconds)
        if not slept and self.session.samples_learned >= 300:
            slept.append(2 * max_poll_interval_ms / 1000)
            time.sleep(slept[0])

    monkeypatch.setattr(Service, "_learned", slow_once)
    every_updates, batch = 20, 10
    config = service_config(
        memory_broker,
        topic,
        tmp_path,
        kafka={"consumer": {**FAST_GROUP, "max_poll_interval_ms": max_poll_interval_ms}},
        checkpoint={"every_updates": every_updates},
        learner={"noise": {"knn": False, "small_loss": False}},
    )
    audit = tmp_path / "audit.jsonl"
    service = ServiceThread(config)
    publisher = publish_in_background(digits_stream, memory_broker, topic, rate=200)
    try:
        publisher.join(60)
        wait_until(lambda: len(learned_offsets(audit)) >= DIGITS, 60, "every sample learned")
        assert service.thread.is_alive(), f"serve stopped: {service.error!r}"
    finally:
        report = service.stop()

    assert slept, "the slow step never ran"
    assert "poll timeout has expired" in caplog.text  # kafka-python did leave the group
    assert "partitions lost" in caplog.text
    counts = learned_offsets(audit)
    assert len(counts) == DIGITS, "an offset was skipped"
    assert 0 <= sum(counts.values()) - DIGITS <= every_updates * batch
    assert report["samples_learned"] == DIGITS
