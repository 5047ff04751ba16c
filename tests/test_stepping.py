"""The fused SGD step applies exactly what `torch.optim.SGD.step` applies, or defers to it."""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from streamcl.learner.stepping import WeightStep, is_plain_sgd


def _model_and_batch(seed: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    return model, torch.randn(20, 12), torch.randint(0, 4, (20,))


def _train(model: torch.nn.Module, stepper: WeightStep | torch.optim.Optimizer, x, y) -> None:
    """Five steps through `stepper`: a `WeightStep`, or the optimizer itself (whose
    `zero_grad` sets gradients to None by default, as `WeightStep`'s does)."""
    for _ in range(5):
        stepper.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        stepper.step()


def _same_training(make_optimizer) -> tuple[list[torch.Tensor], list[torch.Tensor], WeightStep]:
    fused_model, x, y = _model_and_batch(0)
    torch_model, _, _ = _model_and_batch(0)
    weight_step = WeightStep(make_optimizer(fused_model))
    _train(fused_model, weight_step, x, y)
    _train(torch_model, make_optimizer(torch_model), x, y)
    return list(fused_model.parameters()), list(torch_model.parameters()), weight_step


def test_plain_sgd_is_fused_and_bit_identical_to_torch_sgd() -> None:
    fused, reference, step = _same_training(lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    assert step.fused
    for a, b in zip(fused, reference, strict=True):
        assert torch.equal(a, b)


def test_parameter_groups_keep_their_own_learning_rates_read_at_each_step() -> None:
    model, x, y = _model_and_batch(1)
    first, second = model[0], model[2]
    optimizer = torch.optim.SGD(
        [{"params": first.parameters(), "lr": 0.0}, {"params": second.parameters(), "lr": 0.5}]
    )
    step = WeightStep(optimizer)
    frozen = first.weight.detach().clone()
    before = second.weight.detach().clone()
    _train(model, step, x, y)
    assert torch.equal(first.weight, frozen)
    assert not torch.equal(second.weight, before)
    optimizer.param_groups[0]["lr"] = 0.5  # a scheduler's change takes effect at the next step
    _train(model, step, x, y)
    assert not torch.equal(first.weight, frozen)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=1e-3),
        lambda m: torch.optim.Adam(m.parameters(), lr=0.01),
    ],
    ids=["momentum", "weight-decay", "adam"],
)
def test_other_optimizers_step_through_torch_unchanged(make_optimizer) -> None:
    fused, reference, step = _same_training(make_optimizer)
    assert not step.fused
    assert not is_plain_sgd(step.optimizer)
    for a, b in zip(fused, reference, strict=True):
        assert torch.equal(a, b)


def test_step_hooks_still_run() -> None:
    model, x, y = _model_and_batch(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls: list[str] = []
    optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *_: calls.append("post"))
    _train(model, WeightStep(optimizer), x, y)
    assert calls == ["pre", "post"] * 5


def test_a_global_step_hook_still_runs() -> None:
    model, x, y = _model_and_batch(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls: list[int] = []
    handle = register_optimizer_step_pre_hook(lambda *_: calls.append(1))
    try:
        _train(model, WeightStep(optimizer), x, y)
    finally:
        handle.remove()
    assert len(calls) == 5
