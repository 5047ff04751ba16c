"""The optimizer's step, fused under plain SGD.

`torch.optim.SGD.step` without momentum or weight decay is `p -= lr * g` per parameter,
but around it sit a profiler range, hook dispatch and a Python loop over the parameters;
for the small models of online learning that costs more than the arithmetic (about a
sixth of an MLP 256x2 step at batch 10 + 10 on one CPU thread). `WeightStep` then applies
the same update as one `torch._foreach_add_` per parameter group, reading the group's
learning rate at each step (schedulers keep working), and leaves `optimizer.state` as
SGD would (it keeps none without momentum). Any other optimizer, SGD with momentum,
weight decay, nesterov or maximize, sparse gradients, or step hooks (the distributed
learner's all-reduce is one) go through `optimizer.step()` unchanged.
"""

from __future__ import annotations

from typing import cast

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks


def is_plain_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """SGD whose update is exactly `p -= lr * grad` in every parameter group."""
    return type(optimizer) is torch.optim.SGD and all(
        not group["momentum"]
        and not group["weight_decay"]
        and not group["nesterov"]
        and not group["maximize"]
        for group in optimizer.param_groups
    )


class WeightStep:
    """`zero_grad` and `step` of `optimizer`, fused when it is plain SGD (module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.fused = is_plain_sgd(optimizer)

    def zero_grad(self) -> None:
        if not self.fused:
            self.optimizer.zero_grad(set_to_none=True)
            return
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                param.grad = None

    def step(self) -> None:
        if not self.fused or self._hooked():
            self.optimizer.step()
            return
        updates = []
        for group in self.optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [cast(torch.Tensor, p.grad) for p in params]
            if any(g.is_sparse for g in grads):
                self.optimizer.step()
                return
            updates.append((params, grads, group["lr"]))
        with torch.no_grad():
            for params, grads, lr in updates:
                if params:
                    torch._foreach_add_(params, grads, alpha=-lr)

    def _hooked(self) -> bool:
        """Step hooks registered on this optimizer or on every optimizer run only in `step`."""
        return bool(
            self.optimizer._optimizer_step_pre_hooks
            or self.optimizer._optimizer_step_post_hooks
            or _global_optimizer_pre_hooks
            or _global_optimizer_post_hooks
        )
