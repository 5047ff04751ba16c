"""The online learner and its strategies: contract suite, determinism, state round trips."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from streamcl.deploy.runtime.config import LearnerConfig
from streamcl.deploy.runtime.wiring import build_learner
from streamcl.ingest.errors import ConfigError
from streamcl.ingest.schema import Batch, StreamSpec
from streamcl.learner.models import build_model

SPEC = StreamSpec((8, 8), "uint8", 10)
STRATEGIES = ["naive", "er"]


def make_batches(n_batches: int, size: int = 10, seed: int = 0) -> list[Batch]:
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n_batches):
        labels = rng.integers(0, 10, size)
        # Each class lights its own six pixels over background noise: learnable.
        features = rng.integers(0, 60, (size, 64))
        for row, label in enumerate(labels):
            features[row, label * 6 : label * 6 + 6] = 255
        features = features.reshape(size, 8, 8)
        out.append(
            Batch(
                features=features.astype(np.uint8),
                labels=labels.astype(np.int64),
                tasks=np.full(size, b % 2, dtype=np.int64),
                sample_ids=np.arange(b * size, (b + 1) * size, dtype=np.int64),
                event_times_ms=np.zeros(size, dtype=np.int64),
            )
        )
    return out


def config(strategy: str, **kw: object) -> LearnerConfig:
    return LearnerConfig(strategy=strategy, memory=50, hidden=(32,), device="cpu", **kw)


def params(learner) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    return [p.detach().clone() for p in learner.model.parameters()]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_learning_does_not_mutate_the_input_batch(strategy: str) -> None:
    learner = build_learner(config(strategy), SPEC)
    for batch in make_batches(6):
        before = copy.deepcopy(batch)
        learner.learn(batch)
        for field in ("features", "labels", "tasks", "sample_ids", "event_times_ms"):
            np.testing.assert_array_equal(getattr(batch, field), getattr(before, field))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_same_seed_same_model_different_seed_different_model(strategy: str) -> None:
    runs = []
    for seed in (0, 0, 1):
        learner = build_learner(config(strategy, seed=seed), SPEC)
        for batch in make_batches(20):
            learner.learn(batch)
        runs.append(params(learner))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2], strict=True))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_state_round_trip_resumes_exactly(strategy: str) -> None:
    batches = make_batches(30)
    straight = build_learner(config(strategy), SPEC)
    for batch in batches:
        straight.learn(batch)

    first = build_learner(config(strategy), SPEC)
    for batch in batches[:12]:
        first.learn(batch)
    state = copy.deepcopy(first.state_dict())
    resumed = build_learner(config(strategy, seed=123), SPEC)  # different init, overwritten
    resumed.load_state_dict(state)
    for batch in batches[12:]:
        resumed.learn(batch)
    assert all(torch.equal(a, b) for a, b in zip(params(straight), params(resumed), strict=True))
    # Filters on (the default): a batch that is all suspect with an empty memory is skipped.
    assert resumed.updates == straight.updates > 0


def test_predictions_are_made_before_the_update() -> None:
    learner = build_learner(config("naive", lr=0.5), SPEC)
    batch = make_batches(1)[0]
    expected = learner.predict(batch.features)
    result = learner.learn(batch)
    np.testing.assert_array_equal(result.predictions, expected)
    assert not np.array_equal(
        params(learner)[0], build_learner(config("naive"), SPEC).model[1].weight
    )


def test_er_trains_on_new_plus_replayed_rows() -> None:
    # Random batches: every label disagrees with its neighbours, so the filters are off.
    off = {"knn": False, "small_loss": False}
    learner = build_learner(config("er", replay_size=7, noise=off), SPEC)
    seen_rows: list[int] = []
    learner.model.register_forward_hook(lambda m, inp, out: seen_rows.append(inp[0].shape[0]))
    for batch in make_batches(3):
        learner.learn(batch)
    assert seen_rows == [10, 17, 17]  # the first batch has an empty memory to draw from
    replay = learner.strategies[0]
    assert len(replay.buffer) == 30  # type: ignore[attr-defined]


def test_steps_per_batch_repeats_updates() -> None:
    learner = build_learner(config("er", steps_per_batch=3), SPEC)
    for batch in make_batches(4):
        learner.learn(batch)
    assert learner.updates == 12


def test_er_learns_a_learnable_problem() -> None:
    learner = build_learner(config("er", lr=0.05), SPEC)
    batches = make_batches(150)
    for batch in batches[:-20]:
        learner.learn(batch)
    held = batches[-20:]
    accuracy = np.mean([np.mean(learner.predict(b.features) == b.labels) for b in held])
    assert accuracy > 0.9


def test_models_build_and_bad_names_fail_clearly() -> None:
    x = torch.zeros(4, 8, 8)
    assert build_model("mlp", (8, 8), 10)(x).shape == (4, 10)
    assert build_model("cnn", (8, 8), 10)(x).shape == (4, 10)
    assert build_model("tests.user_model:make", (8, 8), 10)(x).shape == (4, 10)
    with pytest.raises(ConfigError, match=r"model must be .mlp., .cnn. or .module:function."):
        build_model("resnet", (8, 8), 10)
    with pytest.raises(ConfigError, match=r"cannot import model factory .nope\.missing:make."):
        build_model("nope.missing:make", (8, 8), 10)
    with pytest.raises(ConfigError, match=r"returned int, not nn\.Module"):
        build_model("tests.user_model:not_a_model", (8, 8), 10)
    with pytest.raises(ConfigError, match="cnn model needs image inputs"):
        build_model("cnn", (64,), 10)


def test_cuda_request_without_cuda_is_a_startup_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        build_learner(LearnerConfig(device="cuda"), SPEC)


@pytest.mark.gpu
def test_cuda_learner_matches_cpu_within_tolerance() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    batches = make_batches(20)
    results = []
    for device in ("cpu", "cuda"):
        learner = build_learner(
            LearnerConfig(strategy="er", memory=50, hidden=(32,), device=device), SPEC
        )
        for batch in batches:
            learner.learn(batch)
        results.append(learner.predict_proba(batches[0].features))
    np.testing.assert_allclose(results[0], results[1], atol=1e-3)


@pytest.mark.gpu
def test_cuda_defaults_with_index_match_cpu_within_tolerance() -> None:
    """The default corrections (ACE and logit-adjustment offsets built on the host), pinned
    non-blocking copies and the indexed memory on a GPU learn what the CPU learns."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    batches = make_batches(20)
    logits = []
    for device in ("cpu", "cuda"):
        learner = build_learner(
            LearnerConfig(
                strategy="er", memory=50, hidden=(32,), predict_head="knn", device=device
            ),
            SPEC,
        )
        for batch in batches:
            result = learner.learn(batch)
        assert result.loss.device.type == device  # not read back every step
        assert learner.memory is not None and learner.memory.index is not None
        assert learner.memory.index.count == len(learner.memory)
        logits.append(learner._logits(batches[0].features, None, 4096).numpy())
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-3)


@pytest.mark.parametrize("gate_open", [True, False])
def test_an_open_memory_gate_remembers_only_arrivals_the_model_predicts(gate_open: bool) -> None:
    """All ten arrivals are admitted and learned; once a filter has flagged something, only
    the five whose label the model predicted enter the memory."""
    plain_loss = {"ace": False, "logit_adjust_tau": 0}
    learner = build_learner(config("er", loss=plain_loss), SPEC)
    learner.noise_seen = gate_open
    batch = make_batches(1)[0]
    predicted = learner.predict(batch.features)
    labels = np.where(np.arange(10) < 5, predicted, (predicted + 1) % 10)
    result = learner.learn(dataclasses.replace(batch, labels=labels))
    assert result.admitted.all()
    memory = learner.strategies[0].buffer  # type: ignore[attr-defined]
    remembered = sorted(memory.store.labels[: memory.store.size].tolist())
    assert remembered == sorted(labels[:5].tolist() if gate_open else labels.tolist())


def test_a_quarantined_sample_its_neighbours_vouch_for_is_readmitted() -> None:
    """At re-examination the model mispredicts both held samples (it predicts 0 for
    everything); the one whose label its neighbours in the kNN window carry is learned,
    the one labelled against its neighbours is not."""
    learner = build_learner(config("er", quarantine={"recheck_after": 0, "max_checks": 1}), SPEC)
    batches = make_batches(21)
    for batch in batches[:20]:  # fills the kNN filter's window with clean arrivals
        learner.learn(batch)
    assert learner.quarantine is not None and learner.noise_filter is not None
    probe = batches[20]
    row = int(np.flatnonzero(probe.labels != 0)[0])
    label = int(probe.labels[row])
    held = dataclasses.replace(probe, labels=probe.labels.copy())
    held.labels[row + 1] = (held.labels[row + 1] + 1) % 10 or 1  # against its neighbours
    learner.quarantine.add(held, np.array([row, row + 1]), ["knn", "knn"], learner.samples)
    learner._logits = lambda features, tasks, chunk: torch.nn.functional.one_hot(  # type: ignore[method-assign]
        torch.zeros(len(features), dtype=torch.int64), 10
    ).float()
    result = learner.learn(make_batches(1, seed=1)[0])
    assert [s.label for s in result.readmitted] == [label]
    assert [h.sample.label for h in result.rejected] == [int(held.labels[row + 1])]
