"""Checkpoint size, save and restore time after 100k, 300k and 1M samples of a stream.

    python benchmarks/checkpoint_growth.py [--label NAME] [--samples 100000,300000,1000000]
    PYTHONPATH=/path/to/other/checkout python benchmarks/checkpoint_growth.py --label main

A tiny learner (4 features, 4 classes, MLP-8, ER with 100 items, Page-Hinkley on the
error, one thread) learns a stationary task-free stream through the learning session
`serve` uses, in batches of 100, with a 1% diverted probe scored every 1,000 samples.
Noise filters are off: their quarantine is bounded by its capacity but holds a
content-dependent number of samples, which would blur the figure. At each mark it
saves what `serve` checkpoints (learner and session state) with the service's
checkpoint store (atomic write, SHA-256) five times, and restores it into a fresh
learner and session five times (after learning the partial batch: up to 99 pending
samples would vary the size); medians are recorded. A stationary stream is the case
that grew most: no drift event ever cleared the detector's per-sample signal list. Run
it from this checkout and, with PYTHONPATH, from another to compare. Writes
benchmarks/results/checkpoint_growth.json (one entry per --label).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamcl.deploy.runtime.config import DetectorConfig, LearnerConfig, NoiseConfig
from streamcl.deploy.runtime.session import LearningSession
from streamcl.deploy.runtime.wiring import build_learner
from streamcl.evaluation.reservoir import ProbeReservoir
from streamcl.ingest.schema import NO_TASK, Origin, Sample, StreamSpec
from streamcl.learner.checkpoint import CheckpointStore, read_checkpoint

RESULTS = Path(__file__).parent / "results" / "checkpoint_growth.json"
SPEC = StreamSpec((4,), "float32", 4)
CONFIG = LearnerConfig(
    strategy="er",
    hidden=(8,),
    memory=100,
    batch_size=100,
    device="cpu",
    threads=1,
    detector=DetectorConfig(kind="page-hinkley"),
    noise=NoiseConfig(small_loss=False),
)
EVAL_EVERY = 1000
REPEATS = 5


def session() -> LearningSession:
    return LearningSession(
        build_learner(CONFIG, SPEC),
        None,
        CONFIG.batch_size,
        eval_every=EVAL_EVERY,
        probe=ProbeReservoir(0.01, 50, SPEC.num_classes, SPEC.feature_shape, SPEC.dtype),
    )


def feed(target: LearningSession, first: int, count: int, rng: np.random.Generator) -> None:
    """`count` samples of four well-separated Gaussian classes, no task ids."""
    labels = rng.integers(0, SPEC.num_classes, count)
    features = (np.eye(4)[labels] * 3 + rng.normal(size=(count, 4))).astype(np.float32)
    for i in range(count):
        index = first + i
        target.offer(Sample(features[i], int(labels[i]), NO_TASK, index, 0, Origin("t", 0, index)))


def measure(live: LearningSession, directory: Path) -> dict[str, Any]:
    """Checkpoint bytes and median save / restore seconds of the live session's state."""
    store = CheckpointStore(directory, keep=1)
    saves, restores = [], []
    path = directory
    for _ in range(REPEATS):
        started = time.perf_counter()
        path = store.save({"learner": live.learner.state_dict(), "session": live.state_dict()})
        saves.append(time.perf_counter() - started)
    for _ in range(REPEATS):
        fresh = session()
        started = time.perf_counter()
        state = read_checkpoint(path)
        fresh.learner.load_state_dict(state["learner"])
        fresh.load_state_dict(state["session"])
        restores.append(time.perf_counter() - started)
    return {
        "samples_seen": live.samples_seen,
        # Every evaluation (older code kept every row, so its row count is the total).
        "evaluations": getattr(live.matrix, "evaluations", len(live.matrix.rows)),
        "checkpoint_bytes": path.stat().st_size,
        "save_seconds_median": statistics.median(saves),
        "restore_seconds_median": statistics.median(restores),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="this-branch")
    parser.add_argument("--samples", default="100000,300000,1000000")
    args = parser.parse_args()
    marks = sorted(int(m) for m in args.samples.split(","))
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    live = session()
    points = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for mark in marks:
            feed(live, live.samples_seen, mark - live.samples_seen, rng)
            live.flush()  # a partial batch (0-99 samples) would vary the size
            points.append(measure(live, Path(tmp)))
            print(json.dumps(points[-1]), flush=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[args.label] = {
        "config": CONFIG.model_dump(mode="json"),
        "eval_every": EVAL_EVERY,
        "points": points,
        "wall_seconds": time.perf_counter() - started,
        "torch": torch.__version__,
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
