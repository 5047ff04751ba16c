"""streamcl's metrics and Avalanche's agree on the same accuracy matrix.

A real Avalanche run (Naive, then Replay) on class-incremental digits, evaluated on
the test stream after every experience by Avalanche's own metric plugins. The
per-experience accuracies it logs form the matrix R that `streamcl.evaluation.metrics` scores;
its stream accuracy, stream forgetting and stream BWT must equal ours.

Average accuracy and BWT must be equal. Forgetting is defined differently, so the
test checks Avalanche's against its own definition on the matrix and ours against it:
Avalanche's forgetting of g is R[t_g, g] - R[T, g] (accuracy right after g was trained),
streamcl's is max_{k<T} R[k, g] - R[T, g]; equal when no earlier point beat the one
right after training (asserted on the matrix). Avalanche's stream accuracy pools all
test samples, streamcl averages groups: equal with equal-sized test experiences.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from streamcl.evaluation import metrics
from streamcl.ingest.datasets import load_digits

if os.environ.get("STREAMCL_REQUIRE_AVALANCHE") != "1":
    pytest.importorskip("avalanche")
warnings.filterwarnings("ignore", module="avalanche|torchvision|qpsolvers")

TASKS = 5


def digits_npz(path: Path) -> Path:
    """Digits, 5 tasks x 2 classes in class order, 30 test samples per task."""
    data = load_digits()
    order = np.argsort(data.train_y, kind="stable")
    x, y = data.train_x[order], data.train_y[order]
    test_rows = np.concatenate([np.flatnonzero(data.test_y // 2 == t)[:30] for t in range(TASKS)])
    np.savez(
        path,
        features=x,
        labels=y,
        experiences=y // 2,
        eval_features=data.test_x[test_rows],
        eval_labels=data.test_y[test_rows],
        eval_tasks=data.test_y[test_rows] // 2,
    )
    return path


@pytest.mark.parametrize("strategy_name", ["naive", "replay"])
def test_accuracy_forgetting_and_bwt_match_avalanche(tmp_path: Path, strategy_name: str) -> None:
    import torch
    from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
    from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
    from avalanche.training.supervised import Naive

    from streamcl.ingest.avalanche import load_benchmark
    from streamcl.learner.models import mlp

    benchmark = load_benchmark(digits_npz(tmp_path / "digits.npz"))
    torch.manual_seed(0)
    model = mlp((8, 8), 10, (64,))
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(stream=True),
        bwt_metrics(stream=True),
        loggers=[],
    )
    plugins = [ReplayPlugin(100)] if strategy_name == "replay" else []
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=10,
        train_epochs=2,
        eval_mb_size=100,
        evaluator=evaluator,
        plugins=plugins,
    )
    rows, final = [], {}
    for experience in benchmark.train_stream:
        strategy.train(experience)
        final = strategy.eval(benchmark.test_stream)
        rows.append(
            [final[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{g:03d}"] for g in range(TASKS)]
        )
    matrix = np.array(rows)
    last = TASKS - 1
    seen = np.ones(TASKS, bool)
    newest = np.arange(TASKS) == last
    ours_accuracy = metrics.average_accuracy(matrix[last], seen)
    ours_forgetting = metrics.average_forgetting(matrix, last, seen, newest)
    ours_bwt = metrics.backward_transfer(matrix, learned_at=np.arange(TASKS))
    theirs_forgetting = final["StreamForgetting/eval_phase/test_stream"]
    assert ours_accuracy == pytest.approx(final["Top1_Acc_Stream/eval_phase/test_stream"])
    assert ours_bwt == pytest.approx(final["StreamBWT/eval_phase/test_stream"])
    # Avalanche's forgetting is read off the same matrix (R[t_g, g] - R[T, g])...
    right_after = np.mean([matrix[g, g] - matrix[last, g] for g in range(last)])
    assert theirs_forgetting == pytest.approx(right_after)
    assert ours_forgetting > 0.05  # the run forgot something: the comparison is not 0 == 0
    # ...and equals ours wherever no earlier point beat the one right after training;
    # otherwise ours (from the best earlier point) is the larger.
    coincide = all(matrix[:last, g].max() == matrix[g, g] for g in range(last))
    if coincide:
        assert ours_forgetting == pytest.approx(theirs_forgetting)
    else:
        assert ours_forgetting > theirs_forgetting
