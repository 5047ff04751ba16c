"""Weeks-long runs: the session's state and its checkpoints stop growing after warm-up."""

from __future__ import annotations

import io
import itertools
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from kafka import KafkaProducer

from streamcl.deploy.devbroker.tansu import EmbeddedBroker
from streamcl.deploy.runtime.config import DetectorConfig, LearnerConfig
from streamcl.deploy.runtime.service import Service
from streamcl.deploy.runtime.session import LearningSession
from streamcl.deploy.runtime.transfer import publish_stream
from streamcl.deploy.runtime.wiring import build_learner
from streamcl.evaluation.reservoir import ProbeReservoir
from streamcl.evaluation.tracker import RECENT_POINTS
from streamcl.ingest.codec import encode
from streamcl.ingest.errors import ConfigError
from streamcl.ingest.kafka import KafkaSettings
from streamcl.ingest.schema import NO_TASK, Origin, Sample, StreamSpec
from streamcl.learner.tasks import TaskFollower
from tests.brokers import FAST_GROUP, memory_broker, unique_topic  # noqa: F401
from tests.service_helpers import service_config

SPEC = StreamSpec((4,), "float32", 4)
TINY = LearnerConfig(
    strategy="er",
    hidden=(8,),
    memory=40,
    device="cpu",
    detector=DetectorConfig(kind="page-hinkley"),
    # What the kNN filter holds in quarantine (bounded by its capacity) varies the size.
    noise={"knn": False},
)


def stationary_stream(n: int, seed: int = 0) -> list[Sample]:
    """Four well-separated Gaussian classes, no task ids: nothing ever changes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    features = (np.eye(4)[labels] * 3 + rng.normal(size=(n, 4))).astype(np.float32)
    return [Sample(features[i], int(labels[i]), NO_TASK, i, 0, Origin("t", 0, i)) for i in range(n)]


def checkpoint_bytes(session: LearningSession) -> int:
    """The size of what `serve` saves for the learner and the session."""
    buffer = io.BytesIO()
    torch.save({"learner": session.learner.state_dict(), "session": session.state_dict()}, buffer)
    return len(buffer.getvalue())


def test_checkpoint_size_and_structures_stop_growing_after_warm_up() -> None:
    session = LearningSession(
        build_learner(TINY, SPEC),
        None,
        batch_size=10,
        eval_every=10,  # one evaluation per update: per-evaluation state grows fastest
        probe=ProbeReservoir(0.05, 20, SPEC.num_classes, SPEC.feature_shape, SPEC.dtype),
    )
    stream = stationary_stream(12_000)
    sizes, structures, quarantined = [], [], []
    for start in range(0, len(stream), 3_000):
        for sample in stream[start : start + 3_000]:
            session.offer(sample)
        session.flush()  # a partial batch (0-9 samples) would vary the size
        detector = session.learner.state_dict()["detector"]
        sizes.append(checkpoint_bytes(session))
        quarantined.append(session.in_quarantine)
        structures.append(
            (
                len(session.curve),
                len(session.matrix.rows),
                len(detector["event_samples"]),
                len(detector["detector"]),
            )
        )
    evaluations = session.matrix.evaluations
    assert evaluations > 4 * RECENT_POINTS  # far past the warm-up
    # Warm-up: RECENT_POINTS evaluations (2,000 samples). After it, every structure keeps
    # its size: the latest RECENT_POINTS points, plus one first-trained row per class.
    assert structures[1:] == [structures[1]] * 3
    assert structures[1][0] == RECENT_POINTS and structures[1][1] <= RECENT_POINTS + 4
    assert session.learner.detector is not None and session.learner.detector.event_count == 0
    # Equal up to the pickled width of growing counters and torch's 64-byte alignment;
    # before, the detector's signal list alone grew by 4 bytes a sample (12 KB per 3,000).
    assert max(sizes[1:]) - min(sizes[1:]) <= 64, (sizes, quarantined)


def fetch_order(per_partition: list[list[int]], seed: int = 0) -> list[tuple[int, int]]:
    """(partition, task) per sample as a consumer reads them: partitions in turns, each
    turn a fetch of 50 to 1,500 records (kafka-python returns one partition's fetch at a
    time; 1,500 is about 1 MiB of 784-byte samples)."""
    rng = np.random.default_rng(seed)
    positions = [0] * len(per_partition)
    order = []
    while any(p < len(tasks) for p, tasks in zip(positions, per_partition, strict=True)):
        for partition, tasks in enumerate(per_partition):
            take = int(rng.integers(50, 1_501))
            chunk = tasks[positions[partition] : positions[partition] + take]
            order += [(partition, task) for task in chunk]
            positions[partition] += len(chunk)
    return order


def test_interleaved_partitions_record_only_real_task_changes() -> None:
    # Four partitions, each with its own task at the same time; halfway, each partition
    # moves on to a new task (0..3, then 4..7). The real task changes: the arrivals of
    # tasks 1-7 (task 0 opens the stream), whatever the fetch order.
    per_partition = [[p] * 3_000 + [4 + p] * 3_000 for p in range(4)]
    order = fetch_order(per_partition)
    flips = sum(a[1] != b[1] for a, b in itertools.pairwise(order))
    assert flips > 20  # what the old rule (every change of id) recorded as boundaries
    rng = np.random.default_rng(1)
    session = LearningSession(
        build_learner(TINY.model_copy(update={"detector": DetectorConfig()}), SPEC),
        None,
        batch_size=10,
        probe=ProbeReservoir(0.02, 20, SPEC.num_classes, SPEC.feature_shape, SPEC.dtype),
    )
    for index, (partition, task) in enumerate(order):
        label = int(rng.integers(0, 4))
        features = (np.eye(4)[label] * 3 + rng.normal(size=4)).astype(np.float32)
        session.offer(Sample(features, label, task, index, 0, Origin("t", partition, index)))
    boundaries = list(session.learner.boundaries)
    # Tolerance 0: the rule is exact on task ids, for any fetch order within the window.
    assert sorted(b.next_task for b in boundaries) == [1, 2, 3, 4, 5, 6, 7]
    assert session.learner.boundaries.by_reason == {"task": 7}
    # Each boundary is one evaluation (no eval_every here), not one per flip.
    assert session.matrix.evaluations == 7


def test_task_follower_finds_sequential_changes_where_the_id_changes() -> None:
    """Tasks one after another (replay): boundaries where the id changes, as before."""
    tasks = [NO_TASK] * 5 + [0] * 300 + [1] * 40 + [NO_TASK] * 3 + [2] * 500 + [3] * 7 + [4] * 9
    follower = TaskFollower(window=100)
    arrivals = [i for i, task in enumerate(tasks) if follower.arrives(task)]
    assert arrivals == [305, 348, 848, 855]
    # A task back within the window is interleaving; back after it, a new start.
    follower = TaskFollower(window=100)
    back = [0] * 10 + [1] * 50 + [0] * 10 + [1] * 200 + [0] * 5
    arrivals = [i for i, task in enumerate(back) if follower.arrives(task)]
    assert arrivals == [10, 270]
    resumed = TaskFollower(window=100)
    resumed.load_state_dict(follower.state_dict())
    assert resumed.state_dict() == follower.state_dict()
    assert [resumed.arrives(t) for t in (0, 1, 2)] == [False, False, True]
    with pytest.raises(ConfigError, match="task_window must be >= 1 sample, got 0"):
        TaskFollower(window=0)


@pytest.mark.parametrize("batch_size", [1, 7, 10, 64])
def test_task_follower_decides_a_batch_as_it_decides_each_sample(batch_size: int) -> None:
    """`arriving` (a batch at once, fast path for one current task) agrees with `arrives`
    row by row, state included, on sequential, interleaved and task-free runs."""
    rng = np.random.default_rng(batch_size)
    tasks = np.repeat(rng.integers(NO_TASK, 6, 80), rng.integers(1, 150, 80)).astype(np.int64)
    one, batched = TaskFollower(window=100), TaskFollower(window=100)
    expected = [i for i, task in enumerate(tasks.tolist()) if one.arrives(task)]
    found = [
        start + i
        for start in range(0, len(tasks), batch_size)
        for i in batched.arriving(tasks[start : start + batch_size])
    ]
    assert found == expected and len(expected) > 10
    assert batched.state_dict() == one.state_dict()


def test_serve_keeps_no_arrival_time_of_messages_diverted_to_the_probe(
    memory_broker: EmbeddedBroker,  # noqa: F811
    digits_stream: Path,
    tmp_path: Path,
) -> None:
    topic = unique_topic("probe")
    memory_broker.create_topic(topic, partitions=1)
    publish_stream(digits_stream, KafkaSettings(memory_broker.bootstrap_servers), topic)
    config = service_config(
        memory_broker, topic, tmp_path, until_idle=1.0, probe={"fraction": 0.2, "per_class": 30}
    )
    service = Service(config)
    try:
        report = service.run(threading.Event())
    finally:
        service.close()
    assert report["samples_seen"] == 1348 and report["samples_held_out"] > 100
    # Learned samples' arrival times are used and dropped; diverted ones must not stay
    # (before: one entry per diverted message, for ever).
    assert service._arrival_ms == {}


def test_serve_on_four_partitions_with_different_tasks_records_the_real_changes(
    memory_broker: EmbeddedBroker,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The real broker and consumer: partition p carries task p, then task 4 + p."""
    topic = unique_topic("tasks")
    memory_broker.create_topic(topic, partitions=4)
    producer = KafkaProducer(bootstrap_servers=memory_broker.bootstrap_servers)
    rng = np.random.default_rng(0)
    per_phase = 300
    for partition in range(4):
        for offset in range(2 * per_phase):
            task = partition if offset < per_phase else 4 + partition
            label = int(rng.integers(0, 10))
            features = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            sample = Sample(features, label, task, partition * 10_000 + offset, 0)
            producer.send(topic, encode(sample), partition=partition)
    producer.flush()
    producer.close()
    config = service_config(
        memory_broker,
        topic,
        tmp_path,
        until_idle=1.0,
        # Small fetches (about 20 records per partition per turn) interleave the tasks.
        kafka={"consumer": {**FAST_GROUP, "max_partition_fetch_bytes": 2048}},
    )
    service = Service(config)
    try:
        report = service.run(threading.Event())
    finally:
        service.close()
    assert report["samples_seen"] == 8 * per_phase
    order = [
        p if o < per_phase else 4 + p
        for line in (tmp_path / "audit.jsonl").read_text().splitlines()
        for p, o in json.loads(line)["learned"]
    ]
    flips = sum(a != b for a, b in itertools.pairwise(order))
    # The fetch order did interleave the partitions: far more flips than the 7 real
    # changes (19 to 30 seen; how many depends on fetch timing).
    assert flips >= 14, flips
    # Tolerance 0: the arrivals of tasks 1-7, not one boundary per flip.
    assert report["task_boundaries_by_reason"] == {"task": 7}
