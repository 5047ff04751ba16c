"""Crash recovery and graceful shutdown of `streamcl serve` as a real process."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from streamcl.deploy.devbroker.tansu import EmbeddedBroker
from streamcl.deploy.runtime.config import ServiceConfig
from streamcl.deploy.runtime.transfer import publish_stream
from streamcl.ingest.datasets import load_digits
from streamcl.ingest.kafka import KafkaSettings
from streamcl.ingest.scenarios import ScenarioConfig, build, write
from streamcl.learner.checkpoint import CheckpointStore
from tests.brokers import unique_topic
from tests.service_helpers import learned_offsets, service_config, wait_until
from tests.test_service import group_offsets


@pytest.fixture(scope="module")
def permuted_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 permuted tasks of digits: 6,740 samples, long enough to crash into repeatedly."""
    path = tmp_path_factory.mktemp("permuted") / "permuted-digits.scs"
    write(build(load_digits(), ScenarioConfig(scenario="permuted", tasks=5, seed=0)), path)
    return path


def start_service(config: ServiceConfig, workdir: Path, *extra: str) -> subprocess.Popen[bytes]:
    config_file = workdir / "service.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    log = open(workdir / "service.log", "ab")  # noqa: SIM115 - owned by the child process
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamcl.deploy.cli",
            "--log-level",
            "INFO",
            "serve",
            "--config",
            str(config_file),
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def publish_in_background(
    stream: Path, broker: EmbeddedBroker, topic: str, rate: float
) -> threading.Thread:
    settings = KafkaSettings(broker.bootstrap_servers)
    thread = threading.Thread(
        target=publish_stream,
        args=(stream, settings, topic, rate),
        kwargs={"progress": False},
        daemon=True,
    )
    thread.start()
    return thread


def test_kill_9_five_times_then_finish_learns_every_offset(
    memory_broker: EmbeddedBroker, permuted_digits: Path, tmp_path: Path
) -> None:
    topic = unique_topic("crash")
    memory_broker.create_topic(topic)
    every_updates, batch = 10, 10
    config = service_config(
        memory_broker, topic, tmp_path, checkpoint={"every_updates": every_updates}
    )
    total = 6740
    publisher = publish_in_background(permuted_digits, memory_broker, topic, rate=1000)
    audit = tmp_path / "audit.jsonl"
    rng = random.Random(0)
    kills = 5
    for _ in range(kills):
        before = sum(learned_offsets(audit).values())
        process = start_service(config, tmp_path)
        target = before + batch * rng.randint(3, 30)
        try:
            wait_until(
                lambda target=target: sum(learned_offsets(audit).values()) >= target,
                60,
                "the service to learn more",
            )
        finally:
            process.kill()  # SIGKILL: no chance to checkpoint
            process.wait(10)
        assert process.returncode == -signal.SIGKILL
    publisher.join(60)
    final = start_service(
        config, tmp_path, "--until-idle", "2", "--report", str(tmp_path / "report.json")
    )
    assert final.wait(120) == 0, (tmp_path / "service.log").read_text()[-3000:]

    counts = learned_offsets(audit)
    assert set(counts) == {(0, offset) for offset in range(total)}, "an offset was skipped"
    relearned = sum(counts.values()) - total
    # Each crash may lose at most one checkpoint interval plus a partial batch.
    assert 0 <= relearned <= kills * (every_updates * batch + batch)
    report = json.loads((tmp_path / "report.json").read_text())
    # Every message reached the learner: learned, or held back by the noise filters.
    assert (
        report["samples_learned"] + report["samples_quarantined"] + report["samples_rejected_noisy"]
        == total
    )
    assert report["samples_seen"] == (
        report["samples_learned"]
        + report["samples_rejected"]
        + report["samples_quarantined"]
        + report["samples_rejected_noisy"]
        + report["samples_pending"]
    )
    assert group_offsets(memory_broker, f"g-{topic}") == {0: total}


def test_sigterm_exits_0_quickly_with_a_final_checkpoint_and_commit(
    memory_broker: EmbeddedBroker, permuted_digits: Path, tmp_path: Path
) -> None:
    topic = unique_topic("term")
    memory_broker.create_topic(topic)
    config = service_config(
        memory_broker, topic, tmp_path, checkpoint={"every_updates": 100_000, "every_seconds": 3600}
    )
    publisher = publish_in_background(permuted_digits, memory_broker, topic, rate=500)
    process = start_service(config, tmp_path)
    audit = tmp_path / "audit.jsonl"
    try:
        wait_until(lambda: len(learned_offsets(audit)) >= 200, 60, "consumption to start")
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(30)
        exit_seconds = time.monotonic() - signalled
    finally:
        process.kill()
        publisher.join(30)
    assert returncode == 0, (tmp_path / "service.log").read_text()[-3000:]
    assert exit_seconds < 8
    restored = CheckpointStore(tmp_path / "checkpoints").load_latest()
    assert restored is not None, "no final checkpoint"
    [[saved_topic, partition, offset]] = restored.state["offsets"]
    assert (saved_topic, partition) == (topic, 0)
    assert group_offsets(memory_broker, f"g-{topic}") == {0: offset}
    # Everything consumed before the signal is either learned or pending in the checkpoint.
    learned = len(learned_offsets(audit))
    assert learned + restored.state["session"]["pending"]["count"] == offset
    assert offset < 6740  # it was stopped mid-stream
