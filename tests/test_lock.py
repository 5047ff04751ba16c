"""One learner per checkpoint directory, across real processes."""

from __future__ import annotations

import signal
from pathlib import Path

from streamcl.deploy.devbroker.tansu import EmbeddedBroker
from streamcl.deploy.runtime.transfer import publish_stream
from streamcl.ingest.kafka import KafkaSettings
from tests.brokers import memory_broker, unique_topic  # noqa: F401
from tests.service_helpers import service_config, wait_until
from tests.test_recovery import start_service


def test_second_serve_on_a_directory_refuses_and_kill_9_leaves_no_stale_lock(
    memory_broker: EmbeddedBroker,  # noqa: F811
    digits_stream: Path,
    tmp_path: Path,
) -> None:
    topic = unique_topic("lock")
    memory_broker.create_topic(topic)
    publish_stream(digits_stream, KafkaSettings(memory_broker.bootstrap_servers), topic)
    config = service_config(memory_broker, topic, tmp_path)
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    log = first_dir / "service.log"
    first = start_service(config, first_dir)
    try:
        wait_until(lambda: "consuming topic" in log.read_text(), 60, "the first serve to start")
        second = start_service(config, second_dir)
        assert second.wait(60) == 2
        lines = (second_dir / "service.log").read_text().strip().splitlines()
        assert lines[-1] == (
            f"error: checkpoint directory {config.checkpoint.dir} is in use by another "
            f"learner (pid {first.pid}); one learner per checkpoint.dir: stop it or use "
            "another directory"
        )
        assert "Traceback" not in "\n".join(lines)
        assert first.poll() is None, "the refused start disturbed the running one"
    finally:
        first.kill()
        first.wait(10)
    assert first.returncode == -signal.SIGKILL

    third = start_service(config, second_dir)
    try:
        third_log = second_dir / "service.log"
        wait_until(lambda: "consuming topic" in third_log.read_text(), 60, "a new start")
        third.send_signal(signal.SIGTERM)
        assert third.wait(30) == 0, third_log.read_text()[-3000:]
    finally:
        third.kill()
