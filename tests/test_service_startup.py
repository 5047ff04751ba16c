"""`serve` and `demo` start-up: what they say, damaged or foreign checkpoints, no broker."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streamcl.deploy.devbroker.tansu import EmbeddedBroker, free_port
from streamcl.deploy.runtime.serve import run_service
from streamcl.deploy.runtime.service import Service
from streamcl.deploy.runtime.transfer import publish_stream
from streamcl.ingest.errors import ConfigError
from streamcl.ingest.kafka import KafkaSettings
from streamcl.learner.checkpoint import CheckpointError
from tests.brokers import memory_broker, unique_topic  # noqa: F401
from tests.service_helpers import service_config

ROOT = Path(__file__).parent.parent


def streamcl(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run the real console entry point in a fresh process (no log handlers of pytest's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMCL_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-c", "from streamcl.deploy.cli.main import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_serve_without_a_reachable_broker_fails_once_with_the_servers_named(
    tmp_path: Path,
) -> None:
    """It used to log ~30 s of kafka-python ERROR lines, then a message naming no reason."""
    port = free_port()
    result = streamcl(
        "serve",
        "--bootstrap-servers",
        f"127.0.0.1:{port}",
        "--connect-timeout",
        "1",
        "--checkpoint-dir",
        str(tmp_path / "checkpoints"),
        "--http-port",
        "0",
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("error:")] == [
        f"error: cannot reach any Kafka bootstrap server within 1 s: 127.0.0.1:{port} "
        "(connection refused)"
    ]
    # Besides the error, at most the one INFO line saying what it waits for.
    assert len([line for line in lines if f"127.0.0.1:{port}" in line]) <= 2
    assert "Traceback" not in result.stderr
    assert not [line for line in result.stderr.splitlines() if " ERROR kafka" in line]


def test_serve_logs_where_it_listens_what_it_consumes_and_its_progress(
    memory_broker: EmbeddedBroker,  # noqa: F811
    digits_stream: Path,
    tmp_path: Path,
) -> None:
    topic = unique_topic("logs")
    memory_broker.create_topic(topic, partitions=1)
    settings = KafkaSettings(memory_broker.bootstrap_servers)
    publish_stream(digits_stream, settings, topic, progress=False)
    config = tmp_path / "service.yaml"
    raw = service_config(memory_broker, topic, tmp_path).model_dump(mode="json")
    raw["http"]["port"] = 0
    raw["log_every"] = 0.2
    raw["until_idle"] = 3.0
    config.write_text(json.dumps(raw))  # JSON is YAML

    result = streamcl("serve", "--config", str(config))  # no --log-level: INFO by default
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    listening = [
        m for line in lines if (m := re.search(r"listening on http://([\d.]+):(\d+)", line))
    ]
    assert len(listening) == 1
    assert listening[0].group(1) == "127.0.0.1" and int(listening[0].group(2)) > 0
    consuming = [line for line in lines if "consuming topic" in line]
    assert len(consuming) == 1 and f"consuming topic {topic} as group g-{topic}" in consuming[0]
    progress = [line for line in lines if " progress learned=" in line]
    assert progress, result.stderr
    assert all(
        re.search(r"samples_per_second=\S+ lag=\d+ .*prequential_accuracy=", p) for p in progress
    )
    # The final line states the accounting identity: every message in exactly one place.
    # (The noise filters may hold back a few clean digits: that is their business, not this test's.)
    totals = [
        m
        for line in lines
        if (m := re.search(r"processed a total of (\d+) messages ((?:\w+=\d+ ?)+)", line))
    ]
    assert len(totals) == 1 and int(totals[0].group(1)) == 1348
    parts = dict(part.split("=") for part in totals[0].group(2).split())
    assert set(parts) == {
        "learned",
        "quarantined",
        "rejected_noisy",
        "rejected",
        "held_out",
        "pending",
    }
    assert sum(int(v) for v in parts.values()) == 1348
    assert int(parts["learned"]) >= 0.9 * 1348 and parts["pending"] == "0"


def test_demo_logs_json_lines_when_asked(tmp_path: Path) -> None:
    """`--log-format json`: every log line is one JSON object; key=value facts are fields."""
    result = streamcl(
        "--log-format",
        "json",
        "demo",
        "--dataset",
        "digits",
        "--workdir",
        str(tmp_path),
        "--log-every",
        "0.2",
        "--no-progress",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    messages = [r["message"] for r in records]
    assert any(re.fullmatch(r"listening on http://127\.0\.0\.1:[1-9]\d*", m) for m in messages)
    assert any(
        m.startswith("consuming topic streamcl.demo as group streamcl-demo") for m in messages
    )
    progress = [r for r in records if r["message"].startswith("progress ")]
    assert progress
    assert all(isinstance(r["learned"], int) and isinstance(r["lag"], int) for r in progress)
    assert all(isinstance(r["samples_per_second"], float | int) for r in progress)
    assert "published 1348 messages" in result.stdout


def checkpointed_service(broker: EmbeddedBroker, workdir: Path, **extra: object) -> Service:
    return Service(service_config(broker, unique_topic("ckpt"), workdir, **extra))


def test_a_checkpoint_with_flipped_bytes_is_skipped_logged_and_counted(
    memory_broker: EmbeddedBroker,  # noqa: F811
    tmp_path: Path,
) -> None:
    writer = checkpointed_service(memory_broker, tmp_path)
    try:
        assert writer.checkpoint()
        first = writer.checkpoints.paths()[-1]
        with torch.no_grad():
            next(writer.learner.model.parameters()).add_(1.0)
        writer.learner.updates += 1  # a later model, as if it had learned
        assert writer.checkpoint()
        newest = writer.checkpoints.paths()[-1]
        weight = next(writer.learner.model.parameters()).detach().contiguous()
    finally:
        writer.close()
    raw = bytearray(newest.read_bytes())
    at = raw.find(weight.view(torch.uint8).numpy().tobytes())
    assert at >= 0
    raw[at + 100] ^= 0x40  # one flipped bit in the first weight matrix
    newest.write_bytes(bytes(raw))

    reader = checkpointed_service(memory_broker, tmp_path)
    try:
        reader.restore()
        assert reader.learner.updates == 0  # the first checkpoint's model, not the damaged one
        failures = {
            reason: reader.metrics.registry.get_sample_value(
                "streamcl_checkpoint_load_failures_total", {"reason": reason}
            )
            for reason in ("checksum", "unreadable")
        }
        assert failures == {"checksum": 1.0, "unreadable": 0.0}
        assert first.exists()
    finally:
        reader.close()


def test_a_checkpoint_of_other_tensor_shapes_is_a_one_line_error(
    memory_broker: EmbeddedBroker,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Same learner settings, another spec (4x4 inputs): it used to be a RuntimeError."""
    writer = checkpointed_service(memory_broker, tmp_path)
    try:
        assert writer.checkpoint()
    finally:
        writer.close()
    reader = checkpointed_service(
        memory_broker, tmp_path, spec={"feature_shape": [4, 4], "dtype": "uint8", "num_classes": 10}
    )
    try:
        with pytest.raises(CheckpointError, match="does not fit the configured learner") as raised:
            reader.restore()
    finally:
        reader.close()
    message = str(raised.value)
    assert "\n" not in message
    assert "size mismatch" in message and "use another checkpoint.dir" in message
    assert isinstance(raised.value.__cause__, RuntimeError)


def test_an_http_port_in_use_is_a_one_line_start_up_error(
    memory_broker: EmbeddedBroker,  # noqa: F811
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = service_config(memory_broker, unique_topic("port"), tmp_path, http={"port": port})
        with pytest.raises(ConfigError, match=rf"cannot listen on http://127\.0\.0\.1:{port}: "):
            run_service(config)
