"""Strategies against forgetting: a contract suite over every strategy, hand-checked units.

The contract (every strategy, through the learner): a state round trip through
`torch.save` / `torch.load(weights_only=True)` resumes exactly; the same seed gives the
same model; no input is mutated. Then: online EWC's Fisher and penalty by hand,
PackNet's masks and frozen weights, the boundary detector pinned to exact indices.
"""

from __future__ import annotations

import copy
import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from streamcl.deploy.cli.main import cli
from streamcl.deploy.runtime.config import PLAIN_LEARNING, LearnerConfig, ReplayConfig, validated
from streamcl.deploy.runtime.replay import run_replay
from streamcl.deploy.runtime.session import without_timings
from streamcl.deploy.runtime.wiring import build_learner, build_strategies
from streamcl.ingest.codec import encode
from streamcl.ingest.datasets import load_digits
from streamcl.ingest.errors import ConfigError
from streamcl.ingest.recorded import Frame, StreamReader, StreamWriter
from streamcl.ingest.scenarios import ScenarioConfig, build, write
from streamcl.ingest.schema import NO_TASK, Batch, StreamSpec
from streamcl.learner.drift import BoundaryDetector, DriftEvent, PageHinkleyUp
from streamcl.learner.ewc import OnlineEWC
from streamcl.learner.loop import OnlineLearner
from streamcl.learner.packnet import PackNet
from streamcl.learner.strategies import Boundary, UpdateBatch

SPEC = StreamSpec((8, 8), "uint8", 10)
STRATEGIES = ["naive", "er", "ewc", "packnet", "er+ewc", "er+ewc+packnet"]


def task_batches(
    n_tasks: int = 3, per_task: int = 8, size: int = 10, seed: int = 0, task_ids: bool = True
) -> list[Batch]:
    """Task k shows classes 2k and 2k+1, each lighting its own pixels over noise."""
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n_tasks * per_task):
        task = b // per_task
        labels = 2 * task + rng.integers(0, 2, size)
        features = rng.integers(0, 60, (size, 64))
        for row, label in enumerate(labels):
            features[row, label * 6 : label * 6 + 6] = 255
        out.append(
            Batch(
                features=features.reshape(size, 8, 8).astype(np.uint8),
                labels=labels.astype(np.int64),
                tasks=np.full(size, task if task_ids else NO_TASK, dtype=np.int64),
                sample_ids=np.arange(b * size, (b + 1) * size, dtype=np.int64),
                event_times_ms=np.zeros(size, dtype=np.int64),
            )
        )
    return out


def config(strategy: str, **kw: Any) -> LearnerConfig:
    settings: dict[str, Any] = {"memory": 40, "hidden": (32,), "device": "cpu", "lr": 0.05}
    settings.update(kw)
    return LearnerConfig(strategy=strategy, **settings)


def params(learner: OnlineLearner) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner.model.parameters()]


def weights_only_copy(state: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint file gives back: torch.save, then torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same_state(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y)
    else:
        assert a == b


# --- the contract, every strategy ---------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_state_round_trip_through_a_weights_only_file_resumes_exactly(strategy: str) -> None:
    batches = task_batches()
    straight = build_learner(config(strategy), SPEC)
    for batch in batches:
        straight.learn(batch)

    first = build_learner(config(strategy), SPEC)
    for batch in batches[:11]:  # past the first task boundary: consolidated state exists
        first.learn(batch)
    state = weights_only_copy(first.state_dict())
    resumed = build_learner(config(strategy, seed=99), SPEC)  # other init, overwritten
    resumed.load_state_dict(state)
    assert_same_state(resumed.state_dict(), first.state_dict())
    for batch in batches[11:]:
        resumed.learn(batch)
    assert all(torch.equal(a, b) for a, b in zip(params(straight), params(resumed), strict=True))
    assert_same_state(resumed.state_dict(), straight.state_dict())
    probe = batches[0]
    np.testing.assert_array_equal(
        resumed.predict(probe.features, probe.tasks), straight.predict(probe.features, probe.tasks)
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_same_seed_same_model_different_seed_different_model(strategy: str) -> None:
    runs = []
    for seed in (0, 0, 1):
        learner = build_learner(config(strategy, seed=seed), SPEC)
        for batch in task_batches():
            learner.learn(batch)
        runs.append(params(learner))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2], strict=True))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_strategy_mutates_the_batch_or_the_update(strategy: str) -> None:
    learner = build_learner(config(strategy), SPEC)
    for batch in task_batches():
        before = copy.deepcopy(batch)
        learner.learn(batch)
        for field in ("features", "labels", "tasks", "sample_ids", "event_times_ms"):
            np.testing.assert_array_equal(getattr(batch, field), getattr(before, field))
    update = UpdateBatch(
        torch.zeros(4, 8, 8, dtype=torch.uint8),
        torch.tensor([4, 5, 4, 5]),
        torch.tensor([2, 2, 2, 2]),
        num_new=4,
    )
    frozen = copy.deepcopy(update)
    for part in learner.strategies:
        part.prepare(update)
        for field in ("features", "labels", "tasks"):
            assert torch.equal(getattr(update, field), getattr(frozen, field))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_state_is_tensors_and_plain_containers(strategy: str) -> None:
    for part in build_strategies(config(strategy), SPEC):
        fresh = build_strategies(config(strategy), SPEC)[0]
        if type(fresh) is type(part):
            fresh.load_state_dict(weights_only_copy(part.state_dict()))
            assert_same_state(fresh.state_dict(), part.state_dict())


# --- configuration and the command line ---------------------------------------------------


def test_strategy_names_combine_with_plus_in_composition_order() -> None:
    assert LearnerConfig(strategy="ewc+er").strategy == "er+ewc"
    assert LearnerConfig(strategy="packnet+ewc+er").parts == ("er", "ewc", "packnet")
    for bad, message in [
        ("bogus", "strategy must be naive or parts of er, ewc, packnet"),
        ("er+er", "names a part twice"),
        ("naive+ewc", "naive combines with nothing"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validated(LearnerConfig, {"strategy": bad})
    with pytest.raises(ConfigError, match="packnet needs task ids or a boundary detector"):
        validated(LearnerConfig, {"strategy": "packnet", "use_task_ids": False})
    ewc = LearnerConfig(strategy="ewc", ewc={"lambda": 5, "decay": 0.9}).ewc
    assert (ewc.lambda_, ewc.decay) == (5, 0.9)


def test_cli_takes_strategy_settings_from_flags_and_the_config_file(
    digits_stream: Path, tmp_path: Path
) -> None:
    settings = tmp_path / "s.yaml"
    settings.write_text(
        "strategy: er+ewc\newc:\n  lambda: 7\n  consolidate-every: 300\n"
        "detector: {kind: adwin, min_gap: 100}\n"
    )
    report_path = tmp_path / "r.json"
    args = ["replay", "--no-progress", "--config", str(settings), "--stream", str(digits_stream)]
    result = CliRunner().invoke(
        cli, [*args, "--ewc", "lambda=3,decay=0.95", "--report", str(report_path)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["config"]["strategy"] == "er+ewc"
    # A flag replaces the file's whole mapping (like any other flag).
    assert report["config"]["ewc"]["lambda_"] == 3 and report["config"]["ewc"]["decay"] == 0.95
    assert report["config"]["ewc"]["consolidate_every"] == 10_000
    assert report["config"]["detector"] == {**report["config"]["detector"], "kind": "adwin"}
    assert "task boundaries" in result.output
    bad = CliRunner().invoke(cli, [*args, "--ewc", "lambda"])
    assert bad.exit_code == 2 and "expected key=value pairs" in bad.output


def test_replay_with_packnet_reports_a_task_incremental_scenario(
    digits_stream: Path, tmp_path: Path
) -> None:
    # MLP 256x2: ~27 updates per task; plain settings: naive is textbook fine-tuning.
    base = {"stream": digits_stream, "seed": 0, **PLAIN_LEARNING}
    packnet = run_replay(validated(ReplayConfig, {**base, "strategy": "packnet"}), progress=False)
    naive = run_replay(validated(ReplayConfig, {**base, "strategy": "naive"}), progress=False)
    assert packnet["scenario"] == "task-incremental" and naive["scenario"] == "task-agnostic"
    assert packnet["task_boundaries_by_reason"] == {"task": 4}
    assert packnet["drift_events"] == [] and packnet["drift_event_count"] == 0
    # Task ids at test time and isolation: far above class-incremental fine-tuning.
    # Measured over stream and learner seeds 0-4: packnet 0.81-0.95 with forgetting
    # 0.002-0.016, naive 0.11-0.20.
    assert packnet["final_average_accuracy"] >= 0.75
    assert packnet["average_forgetting"] <= 0.03
    assert naive["final_average_accuracy"] < 0.3


def write_task_free_copy(source: Path, target: Path) -> None:
    """The same stream with every task id removed (the held-out sidecar is not needed)."""
    from streamcl.ingest.codec import decode
    from streamcl.ingest.schema import Sample

    with StreamReader(source) as reader, StreamWriter(target, reader.spec, {}) as writer:
        for frame in reader:
            assert isinstance(frame, Frame)
            sample = decode(frame.payload, reader.spec)
            assert isinstance(sample, Sample)
            free = Sample(sample.features, sample.label, NO_TASK, sample.sample_id)
            writer.write(encode(free), frame.offset, frame.timestamp_ms)


PACKNET = ["--strategy", "packnet", "--no-progress"]


def test_packnet_on_a_stream_without_task_ids_is_a_clean_cli_error(
    digits_stream: Path, tmp_path: Path
) -> None:
    free = tmp_path / "free.scs"
    write_task_free_copy(digits_stream, free)
    proc = subprocess.run(
        [sys.executable, "-m", "streamcl.deploy.cli", "replay", "--stream", str(free), *PACKNET],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "PackNet needs task ids or a boundary detector" in proc.stderr
    assert "the batch at sample 0" in proc.stderr and "detector.kind" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_task_free_class_incremental_stream_is_cut_at_each_new_class_pair(
    digits_stream: Path, tmp_path: Path
) -> None:
    report = run_replay(
        validated(
            ReplayConfig,
            {
                "stream": digits_stream,
                "strategy": "er+ewc",
                "use_task_ids": False,
                "detector": {"kind": "page-hinkley", "min_gap": 100},
                "hidden": (32,),
            },
        ),
        progress=False,
    )
    with StreamReader(digits_stream) as reader:
        tasks = np.array([decode_task(f) for f in reader if isinstance(f, Frame)])
    changes = (np.flatnonzero(np.diff(tasks)) + 1).tolist()
    assert len(changes) == 4
    # Each new task brings two unseen classes: one event within a few samples of the change.
    assert report["drift_event_count"] == 4
    for event, change in zip(report["drift_events"], changes, strict=True):
        assert 0 <= event - change < 10
    assert set(report["drift_event_reasons"]) == {"new-class"}
    assert report["task_boundaries_by_reason"] == {"new-class": 4}


def decode_task(frame: Frame) -> int:
    from streamcl.ingest.codec import decode
    from streamcl.ingest.schema import Sample

    sample = decode(frame.payload, SPEC)
    assert isinstance(sample, Sample)
    return sample.task


def test_er_ewc_replay_stops_and_resumes_in_a_fresh_process_to_the_same_report(
    digits_stream: Path, tmp_path: Path
) -> None:
    common = ["--stream", str(digits_stream), "--strategy", "er+ewc", "--no-progress"]
    common += ["--ewc", "lambda=50,consolidate_every=200", "--memory", "100"]
    straight = tmp_path / "straight.json"
    result = CliRunner().invoke(cli, ["replay", *common, "--report", str(straight)])
    assert result.exit_code == 0, result.output
    checkpoint = tmp_path / "run.pt"
    # 677 messages: mid-task, mid-batch (a pending partial batch is saved, not learned).
    result = CliRunner().invoke(
        cli, ["replay", *common, "--stop-after", "677", "--checkpoint", str(checkpoint)]
    )
    assert result.exit_code == 0, result.output
    assert "stopped after 677 messages" in result.output
    torch.load(checkpoint, weights_only=True)  # tensors and plain containers only
    resumed = tmp_path / "resumed.json"
    resume = ["--resume", str(checkpoint), "--report", str(resumed)]
    proc = subprocess.run(
        [sys.executable, "-m", "streamcl.deploy.cli", "replay", *common, *resume],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    a, b = json.loads(straight.read_text()), json.loads(resumed.read_text())
    assert without_timings(a) == without_timings(b)
    assert a["task_boundaries_by_reason"] == {"task": 4}
    other = CliRunner().invoke(cli, ["replay", *common[:-4], "--resume", str(checkpoint)])
    assert isinstance(other.exception, ConfigError)
    assert "written with other settings: ewc, memory" in str(other.exception)


# --- online EWC by hand --------------------------------------------------------------------


def tiny() -> nn.Linear:
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
    return model


def step(ewc: OnlineEWC, model: nn.Module, grad: list[float]) -> None:
    model.weight.grad = torch.tensor([grad])
    ewc.after_backward(model)


def test_running_fisher_is_a_bias_corrected_moving_average_of_squared_gradients() -> None:
    model, ewc = tiny(), OnlineEWC(lambda_=4.0, decay=0.5, gamma=0.5, anchor_lag=0)
    assert ewc.penalty(model) is None  # nothing consolidated yet
    step(ewc, model, [2.0, 0.0])
    step(ewc, model, [0.0, 1.0])
    # R = 0.5 * (0.5 * [4, 0]) + 0.5 * [0, 1] = [1, 0.5]; corrected by 1 - 0.5^2 = 0.75.
    ewc.consolidate(model, Boundary(20, "task", 1))
    torch.testing.assert_close(ewc.fisher()["weight"], torch.tensor([[4 / 3, 2 / 3]]))
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 0.0]]))  # moved by [1, 2] from the anchor
    # lambda/2 * (4/3 * 1^2 + 2/3 * 2^2) = 2 * 4 = 8
    model.weight.grad = torch.tensor([[1.0, -1.0]])  # the task loss's gradient
    penalty = ewc.penalty(model)
    assert penalty is not None and penalty.item() == pytest.approx(8.0)
    assert not penalty.requires_grad  # its gradient is added in closed form:
    # d/dw = lambda * F * (w - w*) = 4 * [4/3, 4/3], on top of the task loss's
    torch.testing.assert_close(model.weight.grad, torch.tensor([[1 + 16 / 3, -1 + 16 / 3]]))
    model.weight.grad = None  # a weight this step's forward did not use
    ewc.penalty(model)
    torch.testing.assert_close(model.weight.grad, torch.tensor([[16 / 3, 16 / 3]]))
    # A second boundary keeps gamma of the old Fisher: 0.5 * [4/3, 2/3] + R3 / (1 - 0.5^3).
    step(ewc, model, [0.0, 0.0])  # R = 0.5 * [1, 0.5] = [0.5, 0.25]
    ewc.consolidate(model, Boundary(30, "periodic", 2))
    expected = torch.tensor([[2 / 3 + 0.5 / 0.875, 1 / 3 + 0.25 / 0.875]])
    torch.testing.assert_close(ewc.fisher()["weight"], expected)


def _ewc_trained(pull_every: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights before and after 40 SGD steps with EWC from step 10: its gradient added
    (`pull_every` None) or taken as a pull on the weights every `pull_every` steps."""
    torch.manual_seed(0)
    inputs, targets = torch.randn(32, 6), torch.randint(0, 3, (32,))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ewc = OnlineEWC(lambda_=50.0, decay=0.9, anchor_lag=0)
    if pull_every is not None:
        ewc.step_with(lambda: optimizer.param_groups[0]["lr"], every=pull_every)
    assert ewc.steps_weights == (pull_every is not None)
    for step_number in range(40):
        if step_number == 10:
            ewc.consolidate(model, Boundary(100, "task", 1))
        if step_number == 25:
            optimizer.param_groups[0]["lr"] = 0.02  # a schedule moved the rate
        rows = slice(step_number % 4 * 8, step_number % 4 * 8 + 8)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(inputs[rows]), targets[rows]).backward()
        ewc.after_backward(model)
        ewc.penalty(model)
        optimizer.step()
    return start, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_ewc_as_a_step_under_plain_sgd_updates_the_weights_as_its_gradient_does() -> None:
    start, by_gradient = _ewc_trained(None)
    _, by_step = _ewc_trained(1)
    assert (by_gradient - start).abs().max() > 0.01  # it learned
    torch.testing.assert_close(by_step, by_gradient, rtol=1e-5, atol=1e-6)


def test_ewc_lazy_pull_stays_close_to_the_pull_of_every_step() -> None:
    _, every_step = _ewc_trained(1)
    _, lazy = _ewc_trained(4)
    _, unpulled = _ewc_trained(10**9)  # never pulls: what EWC's pull changes
    moved = (every_step - unpulled).abs().max()
    assert moved > 1e-3  # the pull matters here
    # Second order in the pull: here, at a large lr lambda F, 15 % of its effect.
    assert (lazy - every_step).abs().max() < 0.25 * moved


def test_ewc_pull_every_must_be_a_positive_number_of_steps() -> None:
    with pytest.raises(ConfigError, match="pull every"):
        OnlineEWC().step_with(lambda: 0.1, every=0)


def test_wiring_fuses_the_ewc_step_only_under_plain_sgd() -> None:
    spec = StreamSpec(feature_shape=(4,), dtype="float32", num_classes=3)
    fused = {}
    for optimizer, momentum, strategy in (
        ("sgd", 0.0, "er+ewc"),
        ("sgd", 0.9, "er+ewc"),
        ("adam", 0.0, "er+ewc"),
        ("sgd", 0.0, "ewc+packnet"),
    ):
        config = LearnerConfig(strategy=strategy, optimizer=optimizer, momentum=momentum)
        ewc = next(s for s in build_learner(config, spec).strategies if isinstance(s, OnlineEWC))
        fused[(optimizer, momentum, strategy)] = ewc.steps_weights
    assert fused == {
        ("sgd", 0.0, "er+ewc"): True,
        ("sgd", 0.9, "er+ewc"): False,
        ("adam", 0.0, "er+ewc"): False,
        ("sgd", 0.0, "ewc+packnet"): False,
    }


def test_ewc_anchors_on_a_snapshot_from_before_a_late_detected_boundary() -> None:
    runs = {}
    for reason in ("drift", "task"):
        model, ewc = tiny(), OnlineEWC(lambda_=1.0, decay=0.5, anchor_lag=2)
        for k in range(1, 6):
            with torch.no_grad():
                model.weight.fill_(float(k))
            step(ewc, model, [float(k), 0.0])
        ewc.consolidate(model, Boundary(50, reason, 1))
        runs[reason] = (ewc.state_dict()["anchor"]["weight"], ewc.fisher()["weight"])
    # Detected: snapshots at steps 2 and 4, the older one anchors (weights 2, R of g = 1, 2).
    r2 = 0.5 * (0.5 * 1.0) + 0.5 * 4.0
    assert torch.equal(runs["drift"][0], torch.full((1, 2), 2.0))
    torch.testing.assert_close(runs["drift"][1], torch.tensor([[r2 / 0.75, 0.0]]))
    # Exact: the current weights (5) and R after five steps.
    r5 = 0.5 * (0.5 * (0.5 * r2 + 0.5 * 9.0) + 0.5 * 16.0) + 0.5 * 25.0
    assert torch.equal(runs["task"][0], torch.full((1, 2), 5.0))
    torch.testing.assert_close(runs["task"][1], torch.tensor([[r5 / (1 - 0.5**5), 0.0]]))


@pytest.fixture(scope="module")
def permuted_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Domain-incremental digits: 3 pixel permutations x 1,348 samples."""
    path = tmp_path_factory.mktemp("streams") / "digits-permuted.scs"
    write(build(load_digits(), ScenarioConfig(scenario="permuted", tasks=3, seed=0)), path)
    return path


def test_ewc_forgets_less_than_naive_with_task_ids_or_with_a_detector(
    permuted_digits: Path,
) -> None:
    def replay(**settings: Any) -> dict[str, Any]:
        config = {"stream": permuted_digits, **PLAIN_LEARNING, **settings}
        return run_replay(validated(ReplayConfig, config))

    naive, ewc = replay(strategy="naive"), replay(strategy="ewc")
    detected = replay(strategy="ewc", use_task_ids=False, detector={"kind": "adwin"})
    # Orderings, not one run's figures: over stream and learner seeds 0-4 EWC forgot
    # 0.012-0.048 less than naive at 0.000-0.024 higher accuracy; ADWIN fired 27-59
    # samples after a change (once it missed one), never elsewhere, and the detected run
    # forgot up to 0.057 less than naive (at worst 0.004).
    assert ewc["average_forgetting"] < naive["average_forgetting"]
    assert ewc["final_average_accuracy"] >= naive["final_average_accuracy"] - 0.01
    events = detected["drift_events"]
    assert events and all(any(c <= e < c + 150 for c in (1348, 2696)) for e in events)
    assert detected["task_boundaries_by_reason"] == {"drift": len(events)}
    assert detected["average_forgetting"] <= naive["average_forgetting"] + 0.01


def test_periodic_consolidation_on_a_stream_without_task_ids_or_detector() -> None:
    learner = build_learner(config("ewc", ewc={"consolidate_every": 50}), SPEC)
    for batch in task_batches(task_ids=False)[:12]:
        learner.learn(batch)
    assert [(b.sample, b.reason, b.next_task) for b in learner.boundaries] == [
        (50, "periodic", 1),
        (100, "periodic", 2),
    ]
    assert learner.strategies[0].consolidations == 2  # type: ignore[attr-defined]


# --- PackNet ------------------------------------------------------------------------------


def packnet_learner(**kw: Any) -> OnlineLearner:
    settings: dict[str, Any] = {"optimizer": "adam", "lr": 0.01}  # Adam moves 0-grad weights
    settings.update(kw)
    return build_learner(config("packnet", **settings), SPEC)


def owners(learner: OnlineLearner) -> dict[str, torch.Tensor]:
    return learner.strategies[0].state_dict()["owner"]


def test_packnet_gives_each_task_half_of_its_used_free_weights_and_masks_are_nested() -> None:
    learner = packnet_learner()
    candidates: list[dict[str, int]] = []  # free weights each task used, at its boundary
    for batch in task_batches(n_tasks=3):
        if learner.samples and learner.task != int(batch.tasks[0]):
            state = learner.strategies[0].state_dict()
            candidates.append(
                {k: int((v & (state["owner"][k] < 0)).sum()) for k, v in state["used"].items()}
            )
        learner.learn(batch)
    owner = owners(learner)
    packnet: PackNet = learner.strategies[0]  # type: ignore[assignment]
    assert packnet.order == [0, 1] and packnet.current == 2 and packnet.phase == "learning"
    for name, table in owner.items():
        # Every weight has at most one owner; ids are the consolidation order.
        assert set(torch.unique(table).tolist()) <= {-1, 0, 1}
        if table.dim() > 1:
            for task in (0, 1):
                assert int((table == task).sum()) == math.ceil(0.5 * candidates[task][name])
        else:  # biases are not pruned: a task keeps every free bias it used
            assert int((table == 0).sum()) == candidates[0][name]
    masks = [packnet.masks(task) for task in (0, 1)]
    assert masks[0] is not None and masks[1] is not None
    for name in owner:
        m0, m1 = masks[0].parameters[name].bool(), masks[1].parameters[name].bool()
        assert torch.equal(m0, owner[name] == 0)
        assert torch.equal(m1 & ~m0, owner[name] == 1)  # task 1's own weights: disjoint
        assert not (m0 & (owner[name] == 1)).any()
    # The heads: a task's logits are its own classes only.
    assert masks[1].classes is not None
    assert masks[1].classes.nonzero().squeeze(1).tolist() == [2, 3]
    assert packnet.masks(2) is not None and packnet.masks(2).parameters == {}  # current: all


def test_packnet_frozen_weights_and_old_task_predictions_never_change() -> None:
    learner = packnet_learner()
    batches = task_batches(n_tasks=3, per_task=10)
    probe = task_batches(n_tasks=1, per_task=2, seed=5)
    for batch in batches[:11]:  # task 0, then the first batch of task 1: task 0 is frozen
        learner.learn(batch)
    owned = {k: v == 0 for k, v in owners(learner).items()}
    frozen = {n: p.detach()[owned[n]].clone() for n, p in learner.model.named_parameters()}
    before = [learner.predict_proba(b.features, b.tasks) for b in probe]
    for batch in batches[11:]:
        learner.learn(batch)
    for name, param in learner.model.named_parameters():
        assert torch.equal(param.detach()[owned[name]], frozen[name])
    after = [learner.predict_proba(b.features, b.tasks) for b in probe]
    for x, y in zip(before, after, strict=True):
        np.testing.assert_array_equal(x, y)  # exactly no forgetting for task 0
    # Released weights were retrained by later tasks.
    free_after_0 = {k: v != 0 for k, v in owners(learner).items()}
    assert any(bool((owners(learner)[k][free_after_0[k]] >= 1).any()) for k in free_after_0)


def test_packnet_state_machine_is_saved_and_rejects_an_unknown_phase() -> None:
    packnet = PackNet(10)
    assert packnet.state_dict()["phase"] == "waiting"
    state = packnet.state_dict()
    state["phase"] = "pruning"
    with pytest.raises(ConfigError, match="unknown phase 'pruning'"):
        PackNet(10).load_state_dict(state)
    with pytest.raises(ConfigError, match=r"prune_fraction must be in \(0, 1\)"):
        PackNet(10, prune_fraction=1.0)


def test_packnet_without_task_ids_or_detector_fails_at_the_first_batch() -> None:
    learner = build_learner(config("packnet"), SPEC)
    with pytest.raises(ConfigError, match="PackNet needs task ids or a boundary detector"):
        learner.learn(task_batches(task_ids=False)[0])


def test_packnet_follows_detected_boundaries_on_a_task_free_stream() -> None:
    learner = build_learner(
        config("packnet", detector={"kind": "page-hinkley", "min_gap": 30}), SPEC
    )
    for batch in task_batches(task_ids=False):
        learner.learn(batch)
    # New class pairs at samples 80 and 160 (the first arrival of each pair).
    assert [(b.reason, b.next_task) for b in learner.boundaries] == [
        ("new-class", 1),
        ("new-class", 2),
    ]
    assert learner.strategies[0].order == [0, 1]  # type: ignore[attr-defined]


# --- the boundary detector ------------------------------------------------------------------


def seeded_errors(seed: int = 0) -> np.ndarray:
    """0/1 errors: rate 0.1 for 3,000 samples, 0.7 for 3,000, 0.1 for 3,000, 0.8 for 3,000."""
    rng = np.random.default_rng(seed)
    rates = np.repeat([0.1, 0.7, 0.1, 0.8], 3000)
    return (rng.random(len(rates)) < rates).astype(np.float64)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("page-hinkley", [3085, 9156]), ("adwin", [3039, 9023])],
)
def test_detector_fires_on_error_increases_only_at_pinned_indices(
    kind: str, expected: list[int]
) -> None:
    errors = seeded_errors()
    labels = np.zeros(len(errors), dtype=np.int64)
    detector = BoundaryDetector(10, kind=kind)  # type: ignore[arg-type]
    events = []
    for start in range(0, len(errors), 10):
        events += detector.update(errors[start : start + 10], labels[start : start + 10], start)
    assert events == [DriftEvent(index, "drift") for index in expected]
    assert detector.events == events
    # The drop at 6,000 (the task learned) is not a boundary.
    assert all(not 6000 <= e.sample < 9000 for e in events)


def test_unseen_class_is_an_event_merged_within_min_gap() -> None:
    detector = BoundaryDetector(10, kind="page-hinkley", min_gap=50)
    zeros = np.zeros(200)
    labels = np.array([0, 1] * 75 + [2, 0, 3] + [0] * 47)
    events = detector.update(zeros[:150], labels[:150], 0)
    assert events == []  # classes 0 and 1 appear at the stream start: absorbed
    events = detector.update(zeros[150:200], labels[150:200], 150)
    assert events == [DriftEvent(150, "new-class")]  # class 3 at 152 merges into it
    assert detector.update(np.zeros(1), np.array([4]), 201) == [DriftEvent(201, "new-class")]
    quiet = BoundaryDetector(10, new_classes=False)
    assert quiet.update(zeros, np.arange(200) % 10, 0) == []


@pytest.mark.parametrize("kind", ["page-hinkley", "adwin"])
def test_detector_state_replays_to_the_same_alarms(kind: str) -> None:
    errors = seeded_errors(seed=3)
    labels = np.zeros(len(errors), dtype=np.int64)
    straight = BoundaryDetector(10, kind=kind)  # type: ignore[arg-type]
    straight.update(errors, labels, 0)
    first = BoundaryDetector(10, kind=kind)  # type: ignore[arg-type]
    first.update(errors[:4500], labels[:4500], 0)
    resumed = BoundaryDetector(10, kind=kind)  # type: ignore[arg-type]
    resumed.load_state_dict(weights_only_copy(first.state_dict()))
    resumed.update(errors[4500:], labels[4500:], 4500)
    assert resumed.events == straight.events and len(straight.events) == 2
    assert_same_state(resumed.state_dict(), straight.state_dict())


@pytest.mark.parametrize("alpha", [1.0, 0.999])
def test_page_hinkley_restated_alarms_exactly_like_rivers(alpha: float) -> None:
    from river import drift

    rng = np.random.default_rng(2)
    values = np.concatenate([seeded_errors(seed=4), rng.random(3000) * 3]).astype(np.float32)
    ours = PageHinkleyUp(30, 0.02, 50.0, alpha)
    rivers = drift.PageHinkley(min_instances=30, delta=0.02, threshold=50.0, alpha=alpha, mode="up")
    alarms = []
    for value in values.tolist():
        ours.update(value)
        rivers.update(value)
        assert ours.drift_detected == rivers.drift_detected
        alarms.append(ours.drift_detected)
    assert sum(alarms) >= 2  # the comparison covered alarms and the resets after them


def test_detector_state_stays_the_same_size_on_a_long_stationary_stream() -> None:
    rng = np.random.default_rng(0)
    labels = np.zeros(20_000, dtype=np.int64)
    errors = (rng.random(20_000) < 0.2).astype(np.float64)  # stationary: no event
    sizes = []
    for kind in ("page-hinkley", "adwin"):
        detector = BoundaryDetector(10, kind=kind)  # type: ignore[arg-type]
        for start in range(0, 20_000, 5_000):
            detector.update(errors[start : start + 5_000], labels[start : start + 5_000], start)
            buffer = io.BytesIO()
            torch.save(detector.state_dict(), buffer)
            sizes.append(len(buffer.getvalue()))
        assert detector.event_count == 0
    # Page-Hinkley's state is five numbers. ADWIN's buckets grow with log2 of its width:
    # 128 bytes per doubling (measured with river 0.26), not 4 bytes per sample as before.
    assert sizes[:4] == [sizes[0]] * 4
    assert sizes[7] - sizes[4] <= 2 * 128 + 64  # two doublings, plus torch's 64-byte alignment


def test_detector_events_are_all_counted_and_the_latest_kept() -> None:
    settings: dict[str, Any] = {"kind": "page-hinkley", "min_gap": 0, "min_instances": 1}
    detector = BoundaryDetector(3, threshold=1.0, **settings)
    labels = np.zeros(1, dtype=np.int64)
    for index in range(1500):  # 60, 0, 60, ...: an alarm every few samples
        detector.update(np.array([0.0 if index % 2 else 60.0]), labels, index)
    kept = detector.events
    assert detector.event_count > len(kept) == 200
    assert kept[-1].sample > kept[0].sample and kept == sorted(kept, key=lambda e: e.sample)
    resumed = BoundaryDetector(3, threshold=1.0, **settings)
    resumed.load_state_dict(weights_only_copy(detector.state_dict()))
    assert resumed.events == kept and resumed.event_count == detector.event_count


def test_detector_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match="detector kind must be page-hinkley or adwin"):
        BoundaryDetector(10, kind="ddm")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="min_gap must be >= 0"):
        BoundaryDetector(10, min_gap=-1)
    with pytest.raises(ConfigError, match="ewc decay must be in"):
        OnlineEWC(decay=1.0)
