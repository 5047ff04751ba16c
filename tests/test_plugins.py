"""Plug-ins by `package.module:function`: a strategy through `streamcl replay`, a memory
selector, a retrieval policy and a noise filter through their registries, and the one-line
errors for names that do not resolve."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from streamcl.deploy.cli.main import cli
from streamcl.deploy.runtime.config import LearnerConfig
from streamcl.deploy.runtime.wiring import build_learner, build_noise_filter, build_strategies
from streamcl.ingest.errors import ConfigError
from streamcl.ingest.registry import Registry
from streamcl.ingest.schema import Batch, StreamSpec
from streamcl.learner.registry import FILTERS, STRATEGIES
from streamcl.learner.strategies import ExperienceReplay
from streamcl.memory.buffer import ReplayBuffer
from tests import plugins

SPEC = StreamSpec((8, 8), "float32", 10)


def test_a_strategy_plugin_runs_end_to_end_from_the_command_line(
    digits_stream: Path, tmp_path: Path
) -> None:
    report_path = tmp_path / "r.json"
    args = ["replay", "--no-progress", "--stream", str(digits_stream), "--report"]
    # Filters off: every arrival is learned, so the hook counts are exact.
    flags = ["--strategy", "tests.plugins:make", "--noise", "knn=false,small_loss=false"]
    result = CliRunner().invoke(cli, [*args, str(report_path), *flags])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    calls = plugins.BUILT[-1].calls
    assert report["config"]["strategy"] == "tests.plugins:make"
    # Every hook ran where the loop documents it: one prepare and one before_step per
    # update, one after_update per batch (136: batches of 10 from 1,348 samples, the last
    # of each task cut short at its boundary), consolidate at each of the 4 boundaries.
    assert calls["prepare"] == calls["before_step"] == report["updates"] == 136
    assert calls["after_update"] == 136
    assert calls["samples"] == report["samples_learned"] == 1348
    assert calls["consolidate"] == report["task_boundaries"] == 4
    # The plug-in zeroes every gradient, so the model never changes: each group scores
    # the same at every evaluation point (naive fine-tuning forgets on this stream).
    matrix = np.array(report["accuracy_matrix"], dtype=float)
    assert len(matrix) == 5 and (matrix == matrix[0]).all()


def test_plugins_compose_after_the_builtins_in_the_order_given() -> None:
    config = LearnerConfig(strategy="tests.plugins:make + ER")
    assert config.strategy == "er+tests.plugins:make"
    strategies = build_strategies(config, SPEC)
    assert [type(s) for s in strategies] == [ExperienceReplay, plugins.Frozen]
    assert plugins.BUILT[-1].context.replay_size == config.replay_draws == 30


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ["--strategy", "nope.missing:make"],
            "cannot import strategy factory 'nope.missing:make': No module named 'nope'",
        ),
        (
            ["--strategy", "tests.plugins:absent"],
            "cannot import strategy factory 'tests.plugins:absent': module 'tests.plugins' "
            "has no attribute 'absent'",
        ),
        (
            ["--strategy", "tests.plugins:not_a_strategy"],
            "strategy factory 'tests.plugins:not_a_strategy' returned int, which lacks "
            "task_aware, prepare",
        ),
        (
            ["--strategy", "tests.plugins:BUILT"],
            "strategy factory 'tests.plugins:BUILT' is a list, not callable",
        ),
        (
            ["--strategy", "er+bogus"],
            "strategy must be naive or parts of er, ewc, packnet or 'package.module:function' "
            "joined by '+' (e.g. er+ewc), got 'er+bogus'",
        ),
        (
            ["--memory-policy", "fifo"],
            "memory selector must be reservoir, class-balanced or 'package.module:function', "
            "got 'fifo'",
        ),
        (
            ["--memory-retrieval", "nope.missing:draw"],
            "cannot import memory retrieval factory 'nope.missing:draw'",
        ),
    ],
)
def test_names_that_do_not_resolve_are_one_line_errors(
    digits_stream: Path, tmp_path: Path, flags: list[str], expected: str
) -> None:
    report = tmp_path / "r.json"
    args = ["replay", "--no-progress", "--stream", str(digits_stream), "--report", str(report)]
    result = CliRunner().invoke(cli, [*args, *flags])
    assert isinstance(result.exception, ConfigError), result.output
    assert expected in str(result.exception) and "\n" not in str(result.exception)
    assert not report.exists()


def test_selector_and_retrieval_plugins_shape_the_memory() -> None:
    buffer = ReplayBuffer(
        3, (1,), "float32", policy="tests.plugins:fifo", retrieval="tests.plugins:Smallest"
    )
    labels = np.arange(5, dtype=np.int64)
    buffer.add(labels[:, None].astype(np.float32), labels, np.zeros(5, np.int64))
    # FIFO slots 0, 1, 2, 0, 1: labels 3 and 4 overwrote 0 and 1.
    assert buffer.store.labels.tolist() == [3, 4, 2]
    draw = buffer.sample(4, torch.Generator().manual_seed(0))
    assert draw.labels.tolist() == [2, 2, 2, 2]
    restored = ReplayBuffer(3, (1,), "float32", policy="tests.plugins:fifo")
    restored.load_state_dict(buffer.state_dict())
    assert restored.selector.state_dict() == {"seen": 5}


def test_a_filter_plugin_named_in_the_noise_settings_quarantines_what_it_flags() -> None:
    config = LearnerConfig(
        noise={"knn": False, "small_loss": False, "extra": "tests.plugins:odd_labels"}
    )
    learner = build_learner(config, SPEC)
    result = learner.learn(Batch.from_arrays(np.zeros((4, 8, 8), np.float32), np.arange(4)))
    assert result.admitted.tolist() == [True, False, True, False]
    assert result.quarantine_reasons == ("odd", "odd")
    with pytest.raises(
        ConfigError, match="noise filters need distinct names, got knn, small-loss, odd, odd"
    ):
        build_noise_filter(
            LearnerConfig(noise={"extra": "tests.plugins:odd_labels+tests.plugins:odd_labels"}),
            SPEC,
            None,
        )


def test_registries_hold_the_builtins_in_composition_order_and_refuse_clashes() -> None:
    assert STRATEGIES.names() == ("naive", "er", "ewc", "packnet")
    assert FILTERS.names() == ("knn", "small-loss")
    registry: Registry[type[object]] = Registry("widget", {"a": object})
    with pytest.raises(ConfigError, match="a widget named 'a' is registered already"):
        registry.register("a", object)
    with pytest.raises(ConfigError, match="widget name must be lower case"):
        registry.register("pkg.mod:f", object)


def test_importing_the_command_line_loads_no_registry() -> None:
    """The config reaches the registries when it checks a value, not at import: they pull
    in torch and faiss, which `streamcl --help` need not load."""
    code = "import sys, streamcl.deploy.cli.main; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"
