"""Noisy digits streams through the learning session: accounting, filter quality, switches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from streamcl.deploy.runtime.config import LearnerConfig, ReplayConfig, validated
from streamcl.deploy.runtime.replay import run_replay
from streamcl.deploy.runtime.session import LearningSession
from streamcl.deploy.runtime.wiring import build_learner
from streamcl.ingest import heldout as heldout_io
from streamcl.ingest.datasets import load_digits
from streamcl.ingest.errors import ConfigError
from streamcl.ingest.scenarios import ScenarioConfig, build, write
from streamcl.ingest.schema import Batch
from streamcl.learner.loop import LearnResult
from tests.data import samples

# Small enough for digits (1,348 training samples): the filters judge from sample ~200 on.
DIGITS = {
    "hidden": (64,),
    "memory": 200,
    "device": "cpu",
    "noise": {
        "knn": True,
        "warmup": 200,
        "loss_window": 300,
        "min_class_samples": 20,
        "knn_window": 300,
        # 8x8 digits' pooled-input neighbourhoods are rarely confident: the plurality
        # floor (0.5) let through 0.30 of corrupted labels against 0.21 without it.
        "knn_min_plurality": 0.0,
        "knn_k": 5,  # it judges again 50 arrivals after each boundary
    },
    "quarantine": {"capacity": 60, "recheck_after": 150},
}


@pytest.fixture(scope="module")
def noisy_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("noisy") / "digits-noise40.scs"
    write(build(load_digits(), ScenarioConfig(tasks=5, seed=0, noise=0.4)), path)
    return path


def test_accounting_identity_holds_after_every_update(noisy_digits: Path) -> None:
    """seen = learned + in quarantine + rejected (noisy) + rejected (invalid) + held out +
    pending, after every sample, with invalid messages mixed in and a quarantine small
    enough to overflow; the report's precision/recall equal a recount from the flags."""
    spec, arrivals = samples(noisy_digits)
    heldout = heldout_io.load(heldout_io.sidecar_path(noisy_digits))
    learner = build_learner(LearnerConfig(**DIGITS), spec)
    results: list[LearnResult] = []
    learn = learner.learn
    learner.learn = lambda batch: results.append(learn(batch)) or results[-1]  # type: ignore[method-assign]
    session = LearningSession(learner, heldout, batch_size=10)
    for i, sample in enumerate(arrivals):
        if i % 97 == 0:
            session.reject("garbage")
        session.offer(sample)
        assert session.accounting_holds(), f"after sample {i}"
    session.flush()
    report = session.report()
    assert report["accounting_holds"]
    assert report["samples_seen"] == (
        report["samples_learned"]
        + report["samples_quarantined"]
        + report["samples_rejected_noisy"]
        + report["samples_rejected"]
        + report["samples_held_out"]
        + report["samples_pending"]
    )
    assert report["samples_rejected"] == len(range(0, len(arrivals), 97))
    assert report["samples_quarantined_total"] == (
        report["samples_readmitted"]
        + report["samples_rejected_noisy"]
        + report["samples_quarantined"]
    )
    assert report["samples_rejected_noisy"] > 0 and report["samples_readmitted"] > 0

    corrupted = heldout.train_corrupted
    rejected = np.array([h.sample.sample_id for r in results for h in r.rejected])
    flags = report["filter"]
    assert flags["corrupted_seen"] == int(corrupted[: len(arrivals)].sum())
    assert flags["rejected_precision"] == pytest.approx(corrupted[rejected].mean())
    assert flags["rejected_recall"] == pytest.approx(
        corrupted[rejected].sum() / corrupted[: len(arrivals)].sum()
    )


def test_filters_keep_most_corrupted_labels_out_of_learning(noisy_digits: Path) -> None:
    """Corrupted labels are a smaller share of what is learned than of what arrived, and of
    the memory; plain ER learns every one of them."""
    filtered = run_replay(ReplayConfig(stream=noisy_digits, **DIGITS), progress=False)
    plain = run_replay(
        ReplayConfig(
            stream=noisy_digits, **{**DIGITS, "noise": {"knn": False, "small_loss": False}}
        ),
        progress=False,
    )
    flags = filtered["filter"]
    learned_share = flags["corrupted_learned"] / filtered["samples_learned"]
    seen_share = flags["corrupted_seen"] / filtered["samples_seen"]
    # Measured: 0.43 of arrivals corrupted, 0.21 of what is learned (seed 0; 0.10 before
    # the kNN filter paused for 100 arrivals after each boundary of these 270-sample tasks).
    assert learned_share < 0.6 * seen_share
    assert flags["quarantined_precision"] > seen_share
    assert plain["filter"]["corrupted_learned"] == plain["filter"]["corrupted_seen"]
    assert plain["samples_quarantined_total"] == 0 and plain["accounting_holds"]


def test_every_part_switches_off(noisy_digits: Path) -> None:
    spec, _ = samples(noisy_digits)
    off = LearnerConfig(
        **{
            **DIGITS,
            "noise": {"knn": False, "small_loss": False},
            "loss": {"ace": False, "logit_adjust_tau": 0},
        }
    )
    learner = build_learner(off, spec)
    assert learner.noise_filter is None and learner.quarantine is None and learner.loss.plain
    knn_only = build_learner(
        LearnerConfig(**{**DIGITS, "noise": {"knn": True, "small_loss": False}}), spec
    )
    assert knn_only.noise_filter is not None
    assert [f.name for f in knn_only.noise_filter.filters] == ["knn"]


@pytest.mark.parametrize(
    "memory", [{}, {"memory_retrieval": "neighbours", "memory_dedup": 0.3}], ids=["plain", "faiss"]
)
def test_filtered_replay_resumes_to_the_same_report(
    noisy_digits: Path, tmp_path: Path, memory: dict[str, Any]
) -> None:
    """Quarantine, windows and priors are in the checkpoint: stop, resume, same report.
    With neighbour retrieval and dedup, the memory's FAISS index is rebuilt on resume."""
    settings = {**DIGITS, **memory, "stream": noisy_digits}
    straight = run_replay(ReplayConfig(**settings), progress=False)
    checkpoint = tmp_path / "run.pt"
    run_replay(ReplayConfig(**settings, stop_after=700, checkpoint=checkpoint), progress=False)
    resumed = run_replay(ReplayConfig(**settings, resume=checkpoint), progress=False)
    for key in ("samples_learned", "samples_quarantined", "samples_rejected_noisy", "filter"):
        assert resumed[key] == straight[key], key
    assert resumed["accuracy_matrix"] == straight["accuracy_matrix"]


def test_memory_heads_answer_from_the_memory_and_need_one(digits_stream: Path) -> None:
    """knn / ncm heads predict through the memory's index; softmax is the model's argmax."""
    spec, arrivals = samples(digits_stream)
    batches = [Batch.from_samples(arrivals[i : i + 10]) for i in range(0, len(arrivals), 10)]
    # One embedding space for all three (auto would give the softmax head pooled inputs).
    settings = {**DIGITS, "memory_embedding": "penultimate"}
    learners = {
        head: build_learner(LearnerConfig(**{**settings, "predict_head": head}), spec)
        for head in ("softmax", "knn", "ncm")
    }
    for learner in learners.values():
        for batch in batches:
            learner.learn(batch)
    features = np.concatenate([b.features for b in batches])
    labels = np.concatenate([b.labels for b in batches])
    memory = learners["knn"].memory
    assert memory is not None and memory.index is not None and memory.index.count == len(memory)
    for head, learner in learners.items():
        predicted = learner.predict(features)
        assert (predicted == labels).mean() > 0.5, head  # 10 classes: chance is 0.1
    np.testing.assert_array_equal(
        learners["knn"].predict(features), memory.predict_scores(features, "knn").argmax(axis=1)
    )
    # The head only predicts: quarantine re-examination and training are the model's.
    weights = [learner.model.state_dict() for learner in learners.values()]
    for other in weights[1:]:
        for name, tensor in weights[0].items():
            assert torch.equal(tensor, other[name]), name
    with pytest.raises(ConfigError, match="predict_head knn needs the er strategy"):
        validated(LearnerConfig, {"strategy": "naive", "predict_head": "knn"})
