"""`streamcl demo`: the whole production path on loopback, with nothing to install by hand.

Starts an embedded Kafka-compatible broker (Tansu), publishes a Split Fashion-MNIST
stream to it while `serve` consumes, learns until the stream is consumed, prints the
summary, and stops everything it started.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

from streamcl.deploy.devbroker.tansu import EmbeddedBroker
from streamcl.deploy.runtime.config import LearnerConfig, ServiceConfig
from streamcl.deploy.runtime.serve import run_service
from streamcl.deploy.runtime.transfer import PublishResult, publish_stream
from streamcl.ingest import heldout as heldout_io
from streamcl.ingest.datasets import DatasetName, load
from streamcl.ingest.kafka import KafkaSettings
from streamcl.ingest.recorded import StreamReader
from streamcl.ingest.scenarios import ScenarioConfig, build, write

log = logging.getLogger(__name__)
DEMO_TOPIC = "streamcl.demo"


def ensure_stream(
    workdir: Path, dataset: DatasetName, data_dir: str | None, seed: int, label_noise: float = 0.0
) -> Path:
    """Build the demo stream once; later demos reuse the file."""
    noisy = f"-noise{label_noise:g}" if label_noise else ""
    stream = workdir / f"split-{dataset}-seed{seed}{noisy}.scs"
    if not stream.exists() or not heldout_io.sidecar_path(stream).exists():
        scenario = ScenarioConfig(tasks=5, seed=seed, noise=label_noise)
        write(build(load(dataset, data_dir), scenario), stream)
    return stream


def run_demo(
    workdir: Path,
    learner: LearnerConfig,
    dataset: DatasetName = "fashion-mnist",
    data_dir: str | None = None,
    rate: float | None = None,
    http_port: int = 0,
    until_idle: float = 5.0,
    progress: bool | None = None,
    label_noise: float = 0.0,
    broker: EmbeddedBroker | None = None,
    topic: str = DEMO_TOPIC,
    log_every: float | None = None,
) -> dict[str, Any]:
    """Run the demo; returns the service's report.

    `broker`: an already running broker to use (and leave running), e.g. to read the
    dead-letter and quarantine topics afterwards; by default one is started and stopped.
    `topic` (its consumer group is named after it) lets demos share a broker.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    stream = ensure_stream(workdir, dataset, data_dir, learner.seed, label_noise)
    with StreamReader(stream) as reader:
        spec = reader.spec
    checkpoints = workdir / "checkpoints"
    shutil.rmtree(checkpoints, ignore_errors=True)  # each demo learns from scratch
    with contextlib.nullcontext(broker) if broker is not None else EmbeddedBroker() as broker:
        broker.create_topic(topic, partitions=1)
        settings = KafkaSettings(broker.bootstrap_servers)
        published: list[PublishResult] = []
        publisher = threading.Thread(
            target=lambda: published.append(
                publish_stream(stream, settings, topic, rate, progress=progress)
            ),
            name="publisher",
            daemon=True,
        )
        publisher.start()
        config = ServiceConfig.model_validate(
            {
                "kafka": {
                    "bootstrap_servers": broker.bootstrap_servers,
                    "topic": topic,
                    "group_id": "streamcl-demo" if topic == DEMO_TOPIC else f"{topic}-learner",
                    "consumer": {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000},
                },
                "spec": spec.to_dict(),
                "learner": learner.model_dump(),
                "checkpoint": {"dir": str(checkpoints)},
                "snapshot": {"dir": str(workdir / "snapshots")},
                "http": {"port": http_port},
                "heldout": str(heldout_io.sidecar_path(stream)),
                "report": str(workdir / "report.json"),
                "until_idle": until_idle,
                **({"log_every": log_every} if log_every is not None else {}),
            }
        )
        report = run_service(config)
        publisher.join(timeout=60)
    report["published"] = published[0].sent if published else 0
    return report
