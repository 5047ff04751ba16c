"""A checkpoint volume that fills up while `serve` learns, and the space it needs."""

from __future__ import annotations

import errno
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from streamcl.deploy.devbroker.tansu import EmbeddedBroker
from streamcl.deploy.runtime.service import Service
from streamcl.deploy.runtime.transfer import publish_stream
from streamcl.ingest.kafka import KafkaSettings
from streamcl.learner.checkpoint import CheckpointStore, read_checkpoint
from tests.brokers import unique_topic
from tests.service_helpers import service_config, wait_until
from tests.test_service import DIGITS, group_offsets

RETRY_MIN, RETRY_MAX = 0.05, 0.4


class FullDisk:
    """`torch.save` that fails like torch's zip writer on a full disk while `full` is set.

    The first save goes through, so there is a durable checkpoint to fall back on.
    """

    def __init__(self) -> None:
        self.real = torch.save
        self.full = threading.Event()
        self.full.set()
        self.saves = 0
        self.failed_at: list[float] = []

    def __call__(self, obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        self.saves += 1
        if self.saves > 1 and self.full.is_set():
            self.failed_at.append(time.monotonic())
            f.write(b"PK\x03\x04" + b"\0" * 4096)  # torch had started the zip archive
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as err:
                raise RuntimeError(
                    "[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4096"
                ) from err
        self.real(obj, f, *args, **kwargs)


def test_a_full_disk_keeps_learning_commits_nothing_new_logs_little_and_recovers(
    memory_broker: EmbeddedBroker,
    digits_stream: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    topic = unique_topic("full")
    memory_broker.create_topic(topic)
    publish_stream(
        digits_stream, KafkaSettings(memory_broker.bootstrap_servers), topic, progress=False
    )
    config = service_config(
        memory_broker,
        topic,
        tmp_path,
        checkpoint={
            "every_updates": 10,
            "every_seconds": 0.3,
            "retry_min_seconds": RETRY_MIN,
            "retry_max_seconds": RETRY_MAX,
        },
        snapshot={"dir": None},
    )
    service = Service(config)
    disk = FullDisk()
    monkeypatch.setattr(torch, "save", disk)
    caplog.set_level(logging.INFO, logger="streamcl")
    stop = threading.Event()
    outcome: dict[str, Any] = {}

    def serve() -> None:
        try:
            outcome["report"] = service.run(stop)
        except BaseException as err:  # surfaced below
            outcome["error"] = err

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(disk.failed_at) >= 6, 60, "six failed checkpoint writes")
        # Learning went on past the one durable checkpoint; the group is committed to it.
        durable = CheckpointStore(config.checkpoint.dir).paths()
        assert len(durable) == 1
        (_, _, durable_offset), *_ = read_checkpoint(durable[0])["offsets"]
        assert service.session.samples_seen > durable_offset + 100
        assert group_offsets(memory_broker, config.kafka.group_id) == {0: durable_offset}
        assert _sample(service, "streamcl_checkpoint_age_seconds") > 0
        # Backoff: each wait at least double the last (up to the ceiling), not every update.
        gaps = [b - a for a, b in zip(disk.failed_at, disk.failed_at[1:], strict=False)]
        for k, gap in enumerate(gaps):
            assert gap >= min(RETRY_MAX, RETRY_MIN * 2**k) * 0.95, (k, gaps)
        failing_lines = [r for r in ours(caplog) if r.levelno >= logging.ERROR]
        assert len(failing_lines) == 1  # the first failure; the summary comes once a minute
        assert "checkpoint failed, retrying with backoff" in failing_lines[0].getMessage()
        assert "RuntimeError: [enforce fail at inline_container.cc:672]" in (
            failing_lines[0].getMessage()
        )
        assert "(from OSError: [Errno 28] No space left on device)" in (
            failing_lines[0].getMessage()
        )

        disk.full.clear()  # space returns
        wait_until(
            lambda: group_offsets(memory_broker, config.kafka.group_id) == {0: DIGITS},
            30,
            "the whole topic committed after recovery",
        )
    finally:
        stop.set()
        thread.join(30)
    assert "error" not in outcome, outcome.get("error")
    report = outcome["report"]
    assert report["committed_offsets"] == {f"{topic}/0": DIGITS}
    failures = len(disk.failed_at)
    assert _sample(service, "streamcl_checkpoint_failures_total") == failures
    newest = CheckpointStore(config.checkpoint.dir).paths()[-1]
    assert _sample(service, "streamcl_checkpoint_bytes") == newest.stat().st_size
    assert _sample(service, "streamcl_checkpoint_age_seconds") == 0.0
    recovered = [r.getMessage() for r in ours(caplog) if "works again" in r.getMessage()]
    assert len(recovered) == 1 and f"failures={failures} " in recovered[0]
    assert not any(r.exc_info for r in ours(caplog))  # no traceback
    service.close()


def ours(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Records of streamcl's packages (kafka-python's own are not under test here)."""
    return [r for r in caplog.records if r.name.startswith("streamcl.")]


def _sample(service: Service, name: str) -> float:
    value = service.metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


def test_space_needed_counts_the_checkpoints_already_held(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    assert store.space_needed(1000) == 4000
    for _ in range(3):
        store.save({"x": torch.zeros(10)})
    held = sum(p.stat().st_size for p in store.paths())
    assert store.space_needed(10_000) == 40_000 - held
    assert store.space_needed(100) == 0  # the files held already make room for four


def test_start_up_warns_when_the_volume_cannot_hold_keep_plus_one(
    memory_broker: EmbeddedBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = service_config(memory_broker, unique_topic("space"), tmp_path)
    writer = Service(config)
    try:
        assert writer.checkpoint()
    finally:
        writer.close()
    size = CheckpointStore(config.checkpoint.dir).paths()[-1].stat().st_size
    needed = 4 * size - size  # keep 3 + 1, one already held
    usage = shutil.disk_usage(tmp_path)
    caplog.set_level(logging.WARNING, logger="streamcl.deploy.runtime.service")
    for free, warned in ((needed - 1, True), (needed, False)):
        caplog.clear()
        monkeypatch.setattr(
            "streamcl.deploy.runtime.commits.shutil.disk_usage",
            lambda _path, free=free: usage._replace(free=free),
        )
        Service(config).close()
        lines = [r.getMessage() for r in caplog.records if "volume too small" in r.getMessage()]
        assert bool(lines) == warned, (free, lines)
        if warned:
            assert (
                f"free_bytes={needed - 1} needed_bytes={needed} checkpoint_bytes={size}"
                in (lines[0])
            )
            assert "keep=3" in lines[0] and "keep + 1" in lines[0]
