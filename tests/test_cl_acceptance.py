"""Acceptance for the strategies against forgetting, on Fashion-MNIST (issue 4's figures).

Sizes, to stay near two minutes on 2 cores: the permuted stream keeps 10,000 training
samples per task (5 tasks, 50,000 samples; the full stream has 60,000 per task), Split
Fashion-MNIST is whole (60,000). Single pass, batch 10, MLP 256x2, SGD lr 0.1, seed 0.
The full-size figures are measured by benchmarks/strategies.py.

Needs Debian's dataset-fashion-mnist; without it these tests skip, unless
STREAMCL_REQUIRE_DATA=1 (set in CI) makes that a failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from streamcl.deploy.runtime.config import PLAIN_LEARNING, ReplayConfig, validated
from streamcl.deploy.runtime.replay import run_replay
from streamcl.deploy.runtime.session import without_timings
from streamcl.ingest.datasets import load
from streamcl.ingest.scenarios import ScenarioConfig, build, write
from tests.data import require_fashion_mnist

SAMPLES_PER_TASK = 10_000
CHANGES = [SAMPLES_PER_TASK * k for k in range(1, 5)]


@pytest.fixture(scope="module")
def fmnist_streams(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_fashion_mnist()
    data = load("fashion-mnist")
    out = tmp_path_factory.mktemp("fmnist-cl")
    streams = {"permuted": out / "permuted.scs", "split": out / "split.scs"}
    permuted = ScenarioConfig("permuted", tasks=5, samples_per_task=SAMPLES_PER_TASK, seed=0)
    write(build(data, permuted), streams["permuted"])
    write(build(data, ScenarioConfig(tasks=5, seed=0)), streams["split"])
    return streams


_reports: dict[str, dict[str, Any]] = {}


def replay(streams: dict[str, Path], stream: str, **settings: Any) -> dict[str, Any]:
    """One replay per distinct setting in this module (the EWC run serves two tests).

    The strategies are measured with the dirty-stream corrections off (PLAIN_LEARNING):
    these are issue 4's figures, a strategy against textbook fine-tuning.
    """
    settings = {**PLAIN_LEARNING, **settings}
    key = json.dumps([stream, settings], sort_keys=True)
    if key not in _reports:
        config = validated(ReplayConfig, {"stream": streams[stream], "seed": 0, **settings})
        _reports[key] = run_replay(config, progress=False)
    return _reports[key]


def test_online_ewc_forgets_far_less_than_naive_on_permuted_fmnist(
    fmnist_streams: dict[str, Path],
) -> None:
    naive = replay(fmnist_streams, "permuted", strategy="naive")
    ewc = replay(fmnist_streams, "permuted", strategy="ewc")
    assert ewc["samples_learned"] == 5 * SAMPLES_PER_TASK
    assert ewc["task_boundaries_by_reason"] == {"task": 4}
    # Seeds 0-2 (benchmarks/seed_spread.py, stream seed = learner seed): naive forgets
    # 0.17-0.24 at 0.58-0.64, EWC keeps 0.23-0.50 of that at 0.04-0.13 higher accuracy.
    # (At full size, 60,000 per task, EWC forgets 0.021 against 0.404: README.)
    assert ewc["average_forgetting"] <= 0.7 * naive["average_forgetting"]
    assert ewc["final_average_accuracy"] > naive["final_average_accuracy"]


def test_packnet_is_task_incremental_and_does_not_forget_on_split_fmnist(
    fmnist_streams: dict[str, Path],
) -> None:
    report = replay(fmnist_streams, "split", strategy="packnet")
    assert report["scenario"] == "task-incremental"
    assert report["samples_learned"] == 60_000
    # Measured: 0.970 / 0.000.
    assert report["average_forgetting"] <= 0.01
    assert report["final_average_accuracy"] >= 0.93


@pytest.mark.parametrize("kind", ["adwin", "page-hinkley"])
def test_detector_finds_the_task_changes_and_drives_ewc_close_to_true_boundaries(
    fmnist_streams: dict[str, Path], kind: str
) -> None:
    detected = replay(
        fmnist_streams, "permuted", strategy="ewc", use_task_ids=False, detector={"kind": kind}
    )
    events = detected["drift_events"]
    near = [e for e in events if any(c <= e < c + 1000 for c in CHANGES)]
    assert all(any(c <= e < c + 1000 for e in events) for c in CHANGES), events
    assert len(events) - len(near) <= 2  # false alarms: none in seeds 0-2
    assert detected["task_boundaries_by_reason"] == {"drift": len(events)}
    true = replay(fmnist_streams, "permuted", strategy="ewc")
    # Seeds 0-2: detected minus true-boundary accuracy -0.055 to +0.022 (one run's
    # figure moves by that much), so the detector may cost at most 0.08.
    assert detected["final_average_accuracy"] >= true["final_average_accuracy"] - 0.08


def test_default_noise_filters_leave_a_clean_shifting_stream_alone(
    fmnist_streams: dict[str, Path],
) -> None:
    """Every arrival after a shift is high-loss: a loss filter that does not start over
    then holds back whole tasks as noise (this run once fell to 0.12)."""
    settings = {"strategy": "ewc", "use_task_ids": False, "detector": {"kind": "adwin"}}
    config = validated(ReplayConfig, {"stream": fmnist_streams["permuted"], "seed": 0, **settings})
    defaults = run_replay(config, progress=False)
    plain = replay(fmnist_streams, "permuted", **settings)
    # EWC with ADWIN on this stream is chaotic: a last-bit change (EWC's penalty as a
    # gradient or as a fused step) moves either run by up to 4 points. Seeds 0-2, both
    # forms: 2.0-5.4 % held back as noisy, accuracy -0.069 to +0.035 against plain. A
    # filter that holds back whole tasks reaches 0.12.
    assert defaults["samples_rejected_noisy"] <= 0.08 * defaults["samples_seen"]
    assert defaults["final_average_accuracy"] >= plain["final_average_accuracy"] - 0.1


def test_er_ewc_resumed_in_a_fresh_process_reports_like_an_uninterrupted_run(
    fmnist_streams: dict[str, Path], tmp_path: Path
) -> None:
    settings = {"stream": fmnist_streams["permuted"], "strategy": "er+ewc"}
    straight = run_replay(validated(ReplayConfig, settings), progress=False)
    checkpoint = tmp_path / "er-ewc.pt"
    stop = 23_457  # task 2, mid-batch: the pending samples travel in the checkpoint
    stopped = run_replay(
        validated(ReplayConfig, {**settings, "stop_after": stop, "checkpoint": checkpoint}),
        progress=False,
    )
    assert stopped["stopped_after"] == stop and stopped["samples_pending"] == 7
    report = tmp_path / "resumed.json"
    flags = ["--strategy", "er+ewc", "--resume", str(checkpoint), "--report", str(report)]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamcl.deploy.cli",
            "replay",
            "--stream",
            str(settings["stream"]),
            *flags,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    resumed = json.loads(report.read_text())
    assert without_timings(resumed) == without_timings(straight)
    # With the default filters on; seeds 0-2: 0.763-0.781, naive 0.64-0.67.
    assert straight["final_average_accuracy"] > 0.72
