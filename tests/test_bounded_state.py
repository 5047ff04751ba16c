"""Weeks-long runs: the session's state and its checkpoints stop growing after warm-up."""

from __future__ import annotations

import io

import numpy as np
import torch

from deploy.config import DetectorConfig, LearnerConfig
from deploy.session import LearningSession
from deploy.wiring import build_learner
from evaluation.reservoir import ProbeReservoir
from evaluation.tracker import RECENT_POINTS
from ingest.schema import NO_TASK, Origin, Sample, StreamSpec

SPEC = StreamSpec((4,), "float32", 4)
TINY = LearnerConfig(
    strategy="er",
    hidden=(8,),
    memory=40,
    device="cpu",
    detector=DetectorConfig(kind="page-hinkley"),
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
