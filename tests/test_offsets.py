"""Resume offsets the topic no longer has, and checkpoints that disagree with the group."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from streamcl.deploy.cli.summary import summary_lines
from streamcl.deploy.devbroker.tansu import EmbeddedBroker
from streamcl.deploy.runtime.config import ResumeConfig, ServiceConfig
from streamcl.deploy.runtime.resume import plan_resume
from streamcl.deploy.runtime.service import Service, kafka_settings
from streamcl.ingest.codec import encode
from streamcl.ingest.kafka import KafkaSettings, KafkaSource, Publisher
from streamcl.ingest.offsets import (
    LogBounds,
    OffsetOutOfRangeError,
    TopicState,
    apply_policy,
    read_topic_state,
)
from streamcl.ingest.schema import Sample, StreamSpec
from tests.brokers import FAST_GROUP, unique_topic
from tests.service_helpers import service_config
from tests.test_service_startup import streamcl

MESSAGES = 100


def test_policy_resets_offsets_outside_the_log_and_refuses_by_naming_them() -> None:
    state = TopicState({("t", p): LogBounds(100, 200) for p in range(4)}, {})
    resume = {("t", 0): 50, ("t", 1): 250, ("t", 2): 150, ("t", 3): 200}  # 200: the end, fine

    earliest, resets = apply_policy(resume, state, "earliest", "from the checkpoint")
    assert earliest == {("t", 0): 100, ("t", 1): 100, ("t", 2): 150, ("t", 3): 200}
    assert [(r.partition, r.reason, r.messages_gone, r.messages_skipped) for r in resets] == [
        (0, "before_start", 50, 0),
        (1, "past_end", 0, 0),
    ]
    latest, resets = apply_policy(resume, state, "latest", "from the checkpoint")
    assert latest == {("t", 0): 200, ("t", 1): 200, ("t", 2): 150, ("t", 3): 200}
    assert [(r.messages_gone, r.messages_skipped) for r in resets] == [(50, 100), (0, 100)]

    with pytest.raises(OffsetOutOfRangeError) as raised:
        apply_policy(resume, state, "refuse", "from the checkpoint")
    message = str(raised.value)
    assert "\n" not in message
    assert "partition t/0: offset 50 is before the log start (log holds 100..200)" in message
    assert "partition t/1: offset 250 is past the log end (log holds 100..200)" in message
    assert "resume.out_of_range" in message


def test_an_unknown_end_checks_the_start_only_and_missing_partitions_are_left_alone() -> None:
    state = TopicState({("t", 0): LogBounds(10, None)}, {})
    offsets, resets = apply_policy({("t", 0): 10**9, ("t", 7): 5}, state, "refuse", "x")
    assert offsets == {("t", 0): 10**9, ("t", 7): 5} and resets == []
    with pytest.raises(OffsetOutOfRangeError, match="offset 3 is before the log start"):
        apply_policy({("t", 0): 3}, state, "refuse", "x")


def publish(broker: EmbeddedBroker, topic: str, count: int = MESSAGES) -> None:
    publisher = Publisher(KafkaSettings(broker.bootstrap_servers))
    for i in range(count):
        publisher.send(topic, encode(Sample(np.full((8, 8), i % 16, np.uint8), i % 10)))
    publisher.flush()
    publisher.close()


def new_topic(broker: EmbeddedBroker, prefix: str) -> str:
    topic = unique_topic(prefix)
    broker.create_topic(topic)
    publish(broker, topic)
    return topic


def write_checkpoint(config: ServiceConfig, offset: int) -> None:
    """A checkpoint claiming partition 0 was learned up to `offset` (as if from an old topic)."""
    writer = Service(config)
    try:
        writer.source.handled = {(config.kafka.topic, 0): offset}
        assert writer.checkpoint()
    finally:
        writer.close()


def commit(broker: EmbeddedBroker, config: ServiceConfig, offset: int) -> None:
    consumer = KafkaConsumer(
        bootstrap_servers=broker.bootstrap_servers,
        group_id=config.kafka.group_id,
        enable_auto_commit=False,
    )
    try:
        tp = TopicPartition(config.kafka.topic, 0)
        consumer.assign([tp])
        consumer.commit({tp: OffsetAndMetadata(offset, "", -1)})
    finally:
        consumer.close(autocommit=False)


def plan(config: ServiceConfig, checkpoint: int | None) -> tuple[dict[Any, int], list[Any]]:
    """What `serve` would seek to, from the real broker's log bounds and group commits."""
    state = read_topic_state(
        kafka_settings(config), config.kafka.topic, config.kafka.group_id, timeout_s=10
    )
    resume = None if checkpoint is None else {(config.kafka.topic, 0): checkpoint}
    return plan_resume(resume, state, config.resume, config.kafka.group_id, config.checkpoint.dir)


def serve(config: ServiceConfig) -> tuple[dict[str, Any], Service]:
    service = Service(config)
    try:
        report = service.run(threading.Event())
    finally:
        service.close()
    return report, service


def out_of_range_count(service: Service, reason: str) -> float | None:
    return service.metrics.registry.get_sample_value(
        "streamcl_offset_out_of_range_total", {"reason": reason}
    )


def test_the_true_log_end_is_read_although_the_broker_lists_less(
    memory_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """Tansu's ListOffsets answers the last batch's base offset + 1; the fetch tells the end."""
    topic = new_topic(memory_broker, "bounds")
    config = service_config(memory_broker, topic, tmp_path)
    state = read_topic_state(kafka_settings(config), topic, config.kafka.group_id, 10)
    assert state.bounds == {(topic, 0): LogBounds(0, MESSAGES)}
    assert state.committed == {}
    missing = read_topic_state(kafka_settings(config), unique_topic("none"), "g", 10)
    assert missing == TopicState({}, {})


def test_a_checkpoint_past_the_end_stops_serve_with_one_line_naming_the_offsets(
    memory_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """The topic was deleted and recreated: 100 messages where the checkpoint says 5000."""
    topic = new_topic(memory_broker, "refuse")
    config = service_config(memory_broker, topic, tmp_path, until_idle=1.0)
    write_checkpoint(config, 5000)
    config_file = tmp_path / "service.yaml"
    config_file.write_text(json.dumps(config.model_dump(mode="json")))

    result = streamcl("serve", "--config", str(config_file))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: resume offsets from the checkpoint do not fit the topic: ")
    assert f"partition {topic}/0: offset 5000 is past the log end (log holds 0..100)" in error


def test_past_the_end_with_policy_earliest_learns_the_new_topic_logged_and_counted(
    memory_broker: EmbeddedBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    topic = new_topic(memory_broker, "earliest")
    config = service_config(
        memory_broker, topic, tmp_path, until_idle=1.0, resume={"out_of_range": "earliest"}
    )
    write_checkpoint(config, 5000)
    caplog.set_level(logging.WARNING, logger="streamcl.deploy.runtime.resume")
    report, service = serve(config)

    assert report["samples_seen"] == MESSAGES  # nothing skipped
    assert report["committed_offsets"] == {f"{topic}/0": MESSAGES}
    assert report["offset_resets"] == [
        {
            "topic": topic,
            "partition": 0,
            "reason": "past_end",
            "offset": 5000,
            "log_start": 0,
            "log_end": MESSAGES,
            "policy": "earliest",
            "new_offset": 0,
            "messages_gone": 0,
            "messages_skipped": 0,
        }
    ]
    assert out_of_range_count(service, "past_end") == 1
    assert out_of_range_count(service, "before_start") == 0
    assert (
        f"offset reset            {topic}/0 past_end 5000 -> 0 (earliest; skipped 0, gone 0)"
        in summary_lines(report)
    )
    (line,) = [r.getMessage() for r in caplog.records if "outside the log" in r.getMessage()]
    assert f"partition={topic}/0 reason=past_end offset=5000 log_start=0 log_end=100 " in line
    assert "policy=earliest new_offset=0 " in line


def test_past_the_end_with_policy_latest_counts_what_it_skips(
    memory_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    topic = new_topic(memory_broker, "latest")
    config = service_config(memory_broker, topic, tmp_path, resume={"out_of_range": "latest"})
    offsets, (reset,) = plan(config, 5000)
    assert offsets == {(topic, 0): MESSAGES}
    assert (reset.reason, reset.new_offset, reset.messages_skipped) == ("past_end", 100, 100)


def test_before_the_log_start_resets_to_it_and_counts_the_messages_gone(
    memory_broker: EmbeddedBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Retention deleted offsets 0-59 (simulated: Tansu cannot truncate a partition)."""
    topic = new_topic(memory_broker, "retention")
    config = service_config(
        memory_broker, topic, tmp_path, until_idle=1.0, resume={"out_of_range": "earliest"}
    )
    write_checkpoint(config, 20)
    real = KafkaConsumer.beginning_offsets
    monkeypatch.setattr(
        KafkaConsumer,
        "beginning_offsets",
        lambda self, partitions: {tp: max(60, o) for tp, o in real(self, partitions).items()},
    )
    report, service = serve(config)
    assert report["samples_seen"] == MESSAGES - 60
    (reset,) = report["offset_resets"]
    assert (reset["reason"], reset["new_offset"]) == ("before_start", 60)
    assert (reset["messages_gone"], reset["messages_skipped"]) == (40, 0)
    assert out_of_range_count(service, "before_start") == 1


def test_a_checkpoint_the_group_disagrees_with_wins_and_both_are_logged(
    memory_broker: EmbeddedBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    topic = new_topic(memory_broker, "disagree")
    config = service_config(memory_broker, topic, tmp_path)
    commit(memory_broker, config, 80)
    caplog.set_level(logging.INFO, logger="streamcl.deploy.runtime.resume")
    offsets, resets = plan(config, 50)
    assert offsets == {(topic, 0): 50} and resets == []
    (record,) = [r for r in caplog.records if "disagree" in r.getMessage()]
    assert record.levelno == logging.WARNING  # the group is ahead: messages learned again
    assert (
        f"partition={topic}/0 checkpoint_offset=50 committed_offset=80 "
        f"group={config.kafka.group_id} using=checkpoint" in record.getMessage()
    )


@pytest.mark.parametrize(
    ("policy", "expected", "said"),
    [
        ("committed", 60, "has not seen the 60 messages before them"),
        ("beginning", 0, "a new model from the start of each partition"),
    ],
)
def test_without_a_checkpoint_the_groups_commits_are_an_explicit_decision(
    memory_broker: EmbeddedBroker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    policy: str,
    expected: int,
    said: str,
) -> None:
    topic = new_topic(memory_broker, "nockpt")
    config = service_config(memory_broker, topic, tmp_path, resume={"without_checkpoint": policy})
    commit(memory_broker, config, 60)
    caplog.set_level(logging.INFO, logger="streamcl.deploy.runtime.resume")
    offsets, _ = plan(config, None)
    assert offsets == {(topic, 0): expected}
    (record,) = [r for r in caplog.records if "no checkpoint" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert said in record.getMessage() and f"{topic}/0@60" in record.getMessage()
    assert "starting fresh" not in caplog.text


def test_lag_shows_a_position_past_the_end_as_negative(memory_broker: EmbeddedBroker) -> None:
    topic = new_topic(memory_broker, "lag")
    source = KafkaSource(
        KafkaSettings(memory_broker.bootstrap_servers, consumer=dict(FAST_GROUP)),
        topic,
        f"g-{topic}",
        StreamSpec((8, 8), "uint8", 10),
    )
    try:
        source.start({(topic, 0): 500})
        deadline = time.monotonic() + 20
        while not source.lag() and time.monotonic() < deadline:
            source.poll(100, 10)
        assert source.lag() == {0: MESSAGES - 500}
    finally:
        source.close()


def test_resume_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="out_of_range"):
        ResumeConfig(out_of_range="skip")  # type: ignore[arg-type]


def test_a_live_position_past_the_end_is_exported_warned_once_and_counted(
    memory_broker: EmbeddedBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The topic is recreated under a running learner: its lag turns negative, not 0."""
    service = Service(service_config(memory_broker, unique_topic("live"), tmp_path))
    try:
        monkeypatch.setattr(service.source, "lag", lambda: {0: -400, 1: 7})
        caplog.set_level(logging.WARNING, logger="streamcl.deploy.runtime.service")
        for _ in range(3):
            service._export_lag()
        registry = service.metrics.registry
        lag = registry.get_sample_value("streamcl_consumer_lag_messages", {"partition": "0"})
        assert lag == -400
        assert out_of_range_count(service, "past_end") == 1
        (line,) = [r.getMessage() for r in caplog.records if "past the log end" in r.getMessage()]
        assert "partition=0 messages_past_end=400" in line
    finally:
        service.close()
