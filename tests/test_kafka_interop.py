"""Kafka as its users run it: compressed topics, unreadable batches, faithful dead letters.

Every test shares this module's one embedded broker (`memory_broker`), each on its own topic.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import CorruptRecordError, UnsupportedCodecError
from kafka.record.default_records import DefaultRecordBatch
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder

from streamcl.deploy.devbroker.tansu import EmbeddedBroker
from streamcl.deploy.runtime.serve import run_service
from streamcl.ingest.codec import encode_json
from streamcl.ingest.datasets import load_digits
from streamcl.ingest.kafka import UNREADABLE, UnreadableBatchError, poll_group
from streamcl.ingest.schema import Sample
from tests import wire_spec_producer
from tests.brokers import FAST_GROUP, memory_broker, unique_topic  # noqa: F401
from tests.service_helpers import (
    PLAIN_LEARNER,
    STREAM,
    UNTIL_IDLE,
    ServiceThread,
    digit_payloads,
    learned_offsets,
    metric,
    produce,
    read_topic_records,
    service_config,
    wait_until,
)


@pytest.mark.parametrize("codec", [None, "gzip", "snappy", "lz4", "zstd"])
def test_every_codec_is_learned_end_to_end(
    memory_broker: EmbeddedBroker,  # noqa: F811
    tmp_path: Path,
    codec: str | None,
) -> None:
    """The broker takes every codec and the service learns all (Tansu stores and serves
    batches uncompressed: the client's side is `test_the_client_decompresses_every_codec`)."""
    topic = unique_topic(f"codec-{codec or 'none'}")
    memory_broker.create_topic(topic)
    produce(memory_broker, topic, digit_payloads(), compression_type=codec)

    config = service_config(
        memory_broker, topic, tmp_path, until_idle=UNTIL_IDLE, learner=PLAIN_LEARNER
    )
    report = run_service(config)

    assert report["samples_seen"] == STREAM
    assert report["samples_learned"] == STREAM
    assert report["samples_rejected"] == 0
    assert set(learned_offsets(tmp_path / "audit.jsonl")) == {(0, o) for o in range(STREAM)}
    assert report["committed_offsets"] == {f"{topic}/0": STREAM}


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_the_client_decompresses_every_codec(codec: str) -> None:
    """Tansu decompresses batches when they are produced and serves them uncompressed, so
    the end-to-end test above never makes the client decompress: this builds a compressed
    batch as a Kafka broker would store and serve it, and reads it with the client's parser."""
    codes = {"gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
    payloads = digit_payloads(5)
    builder = MemoryRecordsBuilder(magic=2, compression_type=codes[codec], batch_size=1 << 20)
    for i, payload in enumerate(payloads):
        builder.append(timestamp=i, key=None, value=payload, headers=[])
    builder.close()
    batch = MemoryRecords(bytes(builder.buffer())).next_batch()
    assert batch.compression_type == codes[codec]
    assert [record.value for record in batch] == payloads


BAD_FIRST, BAD_LAST = 10, 16
"""The batch the client is made unable to decode: offsets 10-16 of partition 1."""
GOOD = {(0, o) for o in range(15)} | {(1, o) for o in [*range(10), *range(17, 27)]}
"""Every readable (partition, offset) of `unreadable_topic`."""
MISSING_LZ4 = UnsupportedCodecError("Libraries for lz4 compression codec not found")


def unreadable_topic(
    broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch, error: Exception = MISSING_LZ4
) -> str:
    """Partition 0: 15 good samples. Partition 1: 10 good samples, a batch of 7 the client
    cannot decode (`error`), 10 good samples.

    The broker serves every batch uncompressed (see above), so a missing codec library
    cannot be staged through it: the client's decompression step is made to fail, as it
    does without the library, for that one batch.
    """
    topic = unique_topic("unreadable")
    broker.create_topic(topic, partitions=2)
    payloads = digit_payloads(42)
    produce(broker, topic, payloads[:15], partition=0)
    for chunk in (payloads[15:25], payloads[25:32], payloads[32:]):
        produce(broker, topic, chunk, partition=1)  # one batch each
    original = DefaultRecordBatch._maybe_uncompress

    def missing_codec(batch: DefaultRecordBatch) -> None:
        if (batch.base_offset, batch.last_offset) == (BAD_FIRST, BAD_LAST):
            raise error
        original(batch)

    monkeypatch.setattr(DefaultRecordBatch, "_maybe_uncompress", missing_codec)
    return topic


@pytest.mark.parametrize(
    "error",
    [MISSING_LZ4, CorruptRecordError("crc"), RuntimeError("LZ4F_decompress failed")],
    ids=["missing-codec", "corrupt", "decompressor-error"],
)
def test_an_unreadable_batch_is_dead_lettered_skipped_and_never_met_again(
    memory_broker: EmbeddedBroker,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
) -> None:
    topic = unreadable_topic(memory_broker, monkeypatch, error)
    config = service_config(memory_broker, topic, tmp_path, learner=PLAIN_LEARNER)
    base = f"http://127.0.0.1:{config.http.port}"
    service = ServiceThread(config)
    try:
        audit = tmp_path / "audit.jsonl"
        wait_until(lambda: len(learned_offsets(audit)) == len(GOOD), 30, "good samples learned")
        # Polling goes on past the batch: it was counted once, not met again and again.
        wait_until(lambda: metric(base, "streamcl_unreadable_batches_total") == 1, 10, "metric")
        assert metric(base, f'streamcl_rejected_samples_total{{reason="{UNREADABLE}"}}') == 7
    finally:
        report = service.stop()
    assert sorted(learned_offsets(audit).items()) == [(o, 1) for o in sorted(GOOD)]
    assert report["rejected_by_reason"] == {UNREADABLE: 7}
    assert report["samples_seen"] == 42 and report["accounting_holds"]
    assert report["committed_offsets"] == {f"{topic}/0": 15, f"{topic}/1": 27}

    dead = read_topic_records(memory_broker, topic + ".dlq")
    assert len(dead) == 1
    headers = {k: v.decode() for k, v in dead[0].headers}
    assert headers["streamcl-reason"] == UNREADABLE
    assert type(error).__name__ in headers["streamcl-detail"]
    assert (headers["source-topic"], headers["source-partition"]) == (topic, "1")
    assert (headers["source-offset"], headers["source-offset-last"]) == ("10", "16")

    again = run_service(
        service_config(memory_broker, topic, tmp_path, until_idle=UNTIL_IDLE, learner=PLAIN_LEARNER)
    )
    assert again["samples_seen"] == 42  # restored from the checkpoint, nothing re-read
    assert len(read_topic_records(memory_broker, topic + ".dlq")) == 1


def test_on_unreadable_stop_stops_once_naming_the_batch_and_skip_passes_it(
    memory_broker: EmbeddedBroker,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = unreadable_topic(memory_broker, monkeypatch)
    stop = service_config(
        memory_broker,
        topic,
        tmp_path,
        until_idle=UNTIL_IDLE,
        learner=PLAIN_LEARNER,
        kafka={"on_unreadable": "stop"},
    )
    with pytest.raises(
        UnreadableBatchError,
        match=rf"partition 1 offsets {BAD_FIRST}-{BAD_LAST} .*kafka.on_unreadable: skip",
    ):
        run_service(stop)
    skip = service_config(
        memory_broker, topic, tmp_path, until_idle=UNTIL_IDLE, learner=PLAIN_LEARNER
    )
    report = run_service(skip)
    # What was learned before the stop was checkpointed: learned once, not again.
    learned = learned_offsets(tmp_path / "audit.jsonl")
    assert sorted(learned.items()) == [(o, 1) for o in sorted(GOOD)]
    assert report["rejected_by_reason"] == {UNREADABLE: 7}
    assert report["committed_offsets"] == {f"{topic}/0": 15, f"{topic}/1": 27}


def test_a_dead_letter_keeps_key_headers_and_timestamp(
    memory_broker: EmbeddedBroker,  # noqa: F811
    tmp_path: Path,
) -> None:
    topic = unique_topic("dlq-faithful")
    memory_broker.create_topic(topic)
    sent = [  # (key, headers, timestamp_ms, value): two rejects around a good sample
        (b"user-7", [("trace-id", b"abc"), ("schema", b"v2")], 1_600_000_000_123, b"\x00junk"),
        (None, [], 1_600_000_000_456, digit_payloads(1)[0]),
        (b"user-8", [("trace-id", b"def")], 1_600_000_000_789, b'{"label": 3}'),
    ]
    client = KafkaProducer(bootstrap_servers=memory_broker.bootstrap_servers, acks="all")
    for key, headers, timestamp, value in sent:
        client.send(topic, value, key=key, headers=headers, timestamp_ms=timestamp)
    client.flush(timeout=10)
    client.close(timeout=5)

    report = run_service(service_config(memory_broker, topic, tmp_path, until_idle=UNTIL_IDLE))
    assert report["rejected_by_reason"] == {"garbage": 1, "missing_field": 1}

    dead = read_topic_records(memory_broker, topic + ".dlq")
    assert len(dead) == 2
    for message, (key, headers, timestamp, value), offset, reason in zip(
        dead, (sent[0], sent[2]), (0, 2), ("garbage", "missing_field"), strict=True
    ):
        assert (message.key, message.timestamp, message.value) == (key, timestamp, value)
        assert message.headers[: len(headers)] == headers  # the original ones, first
        added = dict(message.headers[len(headers) :])
        assert added["streamcl-reason"] == reason.encode()
        assert added["streamcl-detail"]
        assert added["source-topic"] == topic.encode()
        assert (added["source-partition"], added["source-offset"]) == (b"0", str(offset).encode())


def test_side_topics_are_created_like_the_source_and_keep_each_partitions_order(
    memory_broker: EmbeddedBroker,  # noqa: F811
    tmp_path: Path,
) -> None:
    topic = unique_topic("dlq-order")
    memory_broker.create_topic(topic, partitions=3)
    client = KafkaProducer(bootstrap_servers=memory_broker.bootstrap_servers, acks="all")
    for partition in range(3):
        for n in range(4):  # keys that hash anywhere: the source partition decides
            client.send(topic, b"\x00junk", key=f"k{n}-{partition}".encode(), partition=partition)
    client.flush(timeout=10)
    client.close(timeout=5)

    report = run_service(service_config(memory_broker, topic, tmp_path, until_idle=UNTIL_IDLE))
    assert report["rejected_by_reason"] == {"garbage": 12}

    consumer = KafkaConsumer(bootstrap_servers=memory_broker.bootstrap_servers)
    try:  # created with the source's 3 partitions, not the broker's auto-created 4
        assert consumer.partitions_for_topic(topic + ".dlq") == {0, 1, 2}
        assert consumer.partitions_for_topic(topic + ".quarantine") == {0, 1, 2}
    finally:
        consumer.close()
    dead = read_topic_records(memory_broker, topic + ".dlq")
    placed = [
        (
            r.partition,
            int(dict(r.headers)["source-partition"]),
            int(dict(r.headers)["source-offset"]),
        )
        for r in dead
    ]
    assert placed == [(p, p, offset) for p in range(3) for offset in range(4)]


def test_empty_tombstone_and_bom_values_through_the_broker(
    memory_broker: EmbeddedBroker,  # noqa: F811
    tmp_path: Path,
) -> None:
    topic = unique_topic("values")
    memory_broker.create_topic(topic)
    data = load_digits()
    bom_json = b"\xef\xbb\xbf" + encode_json(Sample(data.train_x[0], int(data.train_y[0])))
    client = KafkaProducer(bootstrap_servers=memory_broker.bootstrap_servers, acks="all")
    for value, key in ((b"", b"k-empty"), (None, b"k-tombstone"), (bom_json, None)):
        client.send(topic, value, key=key)
    client.flush(timeout=10)
    client.close(timeout=5)

    report = run_service(
        service_config(memory_broker, topic, tmp_path, until_idle=UNTIL_IDLE, learner=PLAIN_LEARNER)
    )
    assert report["rejected_by_reason"] == {"empty": 1, "tombstone": 1}
    assert report["samples_learned"] == 1
    assert set(learned_offsets(tmp_path / "audit.jsonl")) == {(0, 2)}
    dead = read_topic_records(memory_broker, topic + ".dlq")
    assert [(m.key, m.value) for m in dead] == [(b"k-empty", b""), (b"k-tombstone", None)]


def test_a_producer_written_from_the_spec_alone_is_learned(
    memory_broker: EmbeddedBroker,  # noqa: F811
    tmp_path: Path,
) -> None:
    topic = unique_topic("spec-producer")
    memory_broker.create_topic(topic)
    data = load_digits()
    payloads = [
        wire_spec_producer.encode(
            data.train_x[i].ravel().tolist(), [8, 8], "uint8", int(data.train_y[i]), i // 8, i, i
        )
        for i in range(STREAM)
    ]
    produce(memory_broker, topic, payloads, compression_type="zstd")
    report = run_service(
        service_config(memory_broker, topic, tmp_path, until_idle=UNTIL_IDLE, learner=PLAIN_LEARNER)
    )
    assert report["samples_learned"] == STREAM and report["samples_rejected"] == 0


def test_a_consumer_polling_in_slices_with_work_between_joins_its_group(
    memory_broker: EmbeddedBroker,  # noqa: F811
) -> None:
    """kafka-python 3.0.12 drops a join that completes between polls: Tansu holds JoinGroup
    ~1 s, so 100 ms polls 1 s apart always miss it; `poll_group` polls through the join."""
    topic = unique_topic("slices")
    memory_broker.create_topic(topic, partitions=1)
    consumer = KafkaConsumer(
        bootstrap_servers=memory_broker.bootstrap_servers,
        group_id=f"g-{topic}",
        enable_auto_commit=False,
        **FAST_GROUP,
    )
    try:
        consumer.subscribe([topic])
        for _ in range(5):
            poll_group(consumer, 100)
            if consumer.assignment():
                break
            time.sleep(1.0)  # the caller's work between polls
        assert {tp.partition for tp in consumer.assignment()} == {0}
    finally:
        consumer.close(autocommit=False)
