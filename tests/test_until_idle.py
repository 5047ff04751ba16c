"""`--until-idle`: idle time counts only while partitions are assigned; learning nothing fails."""

from __future__ import annotations

import json
import time
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

from streamcl.deploy.devbroker.tansu import EmbeddedBroker
from streamcl.deploy.runtime.transfer import publish_stream
from streamcl.ingest.kafka import ASSIGNORS, KafkaSettings, poll_group
from tests.brokers import FAST_GROUP, memory_broker, unique_topic  # noqa: F401
from tests.service_helpers import ServiceThread, metric, service_config, wait_until
from tests.test_service_startup import streamcl


def test_idle_time_without_partitions_does_not_end_the_run(
    memory_broker: EmbeddedBroker,  # noqa: F811
    digits_stream: Path,
    tmp_path: Path,
) -> None:
    topic = unique_topic("idle")
    memory_broker.create_topic(topic, partitions=1)
    publish_stream(digits_stream, KafkaSettings(memory_broker.bootstrap_servers), topic)
    until_idle = 1.0
    config = service_config(memory_broker, topic, tmp_path, until_idle=until_idle)
    base = f"http://127.0.0.1:{config.http.port}"
    holder = KafkaConsumer(
        bootstrap_servers=memory_broker.bootstrap_servers,
        group_id=config.kafka.group_id,
        enable_auto_commit=False,
        partition_assignment_strategy=ASSIGNORS[config.kafka.rebalance],
        **FAST_GROUP,
    )
    service: ServiceThread | None = None
    try:
        holder.subscribe([topic])
        wait_until(lambda: bool(poll_group(holder, 100) or holder.assignment()), 90, "join")
        holder.pause(*holder.assignment())  # holds the only partition, reads nothing
        service = started = ServiceThread(config)
        # The window starts at serve's first poll, not at its thread's start: building the
        # service took 13-28 s on a loaded 2-core machine, so a window timed from the start
        # ended (and the holder left) before serve ever joined the group.
        wait_until(lambda: first_poll(started, base, holder), 120, "serve's first poll")
        # Far longer than until_idle (and its 3x no-lag fallback) with no partition.
        deadline = time.monotonic() + 6 * until_idle
        while time.monotonic() < deadline:
            poll_group(holder, 100)  # stay in the group
        assert service.thread.is_alive(), f"serve ended without partitions: {service.error!r}"
        assert holder.assignment() == {TopicPartition(topic, 0)}, "the holder lost its partition"
        assert metric(base, "streamcl_updates_total") == 0  # serve had nothing to learn from
    finally:
        holder.close(autocommit=False)
    assert service is not None
    service.thread.join(60)  # gets the partition, learns it all, then idles out
    assert not service.thread.is_alive(), "serve did not stop after the topic went idle"
    report = service.stop()
    assert report["samples_seen"] == 1348  # all of it, after the holder left
    assert report["samples_learned_this_run"] == report["samples_learned"] > 0


def first_poll(service: ServiceThread, base: str, holder: KafkaConsumer) -> bool:
    """Whether serve's loop has polled Kafka (or serve ended); keeps `holder` in the group."""
    poll_group(holder, 100)
    if not service.thread.is_alive():
        return True
    try:
        return metric(base, "streamcl_last_poll_timestamp_seconds") > 0
    except OSError:  # its HTTP server is not listening yet
        return False


def test_until_idle_run_that_learned_nothing_says_so_and_exits_1(
    memory_broker: EmbeddedBroker,  # noqa: F811
    tmp_path: Path,
) -> None:
    topic = unique_topic("empty")
    memory_broker.create_topic(topic, partitions=1)
    raw = service_config(memory_broker, topic, tmp_path, until_idle=1.0).model_dump(mode="json")
    config = tmp_path / "service.yaml"
    config.write_text(json.dumps(raw))
    result = streamcl("serve", "--config", str(config))
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: learned nothing in this run (0 messages seen in total); was the topic empty "
        "or its partitions held by another member?"
    ]
