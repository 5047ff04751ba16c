"""Online elastic weight consolidation for streams, from the gradients the loop computes anyway.

EWC (Kirkpatrick et al. 2017) adds `lambda/2 * sum_i F_i (theta_i - theta*_i)^2`, with F
the diagonal Fisher information at the anchor theta*. For a stream:

- the Fisher is a running estimate, an exponential moving average of the squared
  task-loss gradient of each update (EWC++, Chaudhry et al. 2018, "Riemannian Walk"):
  `R <- decay * R + (1 - decay) * g^2`, bias-corrected by `1 - decay^steps` as in Adam.
  It is read from `.grad` after the loop's backward pass: no extra pass over data. The
  gradient is the mini-batch mean's, so F is smaller than a per-sample Fisher by about
  the batch size; lambda absorbs that scale;
- at a boundary the estimate is consolidated (online EWC, Schwarz et al. 2018,
  "Progress & Compress"): `F <- gamma * F + R_corrected`, `theta* <- theta`. One penalty
  term however many tasks have passed;
- at a *detected* boundary theta and R come from a snapshot `anchor_lag` to
  `2 * anchor_lag` updates old: a detector fires tens of samples after the change, and by
  then the next task's first, largest gradients have entered R and moved theta. Exact
  boundaries (task ids, the periodic one) use the current values.

Per step the running Fisher and the penalty are in-place `torch._foreach_*` ops over all
parameters at once (no Python loop over them, no allocation, no autograd graph, no second
backward pass). The penalty's gradient `lambda F (theta - theta*)` is added to `.grad`
(two ops), or, under plain SGD (`step_with`), taken as its own step on the weights just
before the optimizer's: `theta <- lerp(theta, theta*, lr lambda F)`, one op, and the same
update `theta - lr (g + lambda F (theta - theta*))` since g was computed before it. That
pull runs every `PULL_EVERY` steps, contracting by all of theirs, `1 - (1 - lr lambda
F)^k` (lazy regularisation): the lerp reads three weight-sized tensors, and every step it
cost a third of an MLP-256 ER step on one CPU thread; the gradient steps between pulls
see a pull up to k - 1 steps older, a second-order difference. The
penalty's value only feeds the reported loss, so it is computed at the first step after a
consolidation and every `PENALTY_VALUE_EVERY` steps (a pass that allocates). These ops are
memory-bound: on one CPU thread each pass over an MLP-256's 270k weights costs 50-120 us,
as much as a small model's forward pass, so ER+EWC is measured against ER in
benchmarks/throughput.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from streamcl.ingest.errors import ConfigError
from streamcl.learner.strategies import Boundary, NoHooks

RESCALE_BELOW = 1e-10
"""Fold the running Fisher's lazy decay back into its tensors below this factor."""
PENALTY_VALUE_EVERY = 100
"""Steps between computations of the penalty's value (the reported loss's EWC term)."""
PULL_EVERY = 4
"""Under `step_with`, steps between pulls of the weights towards the anchor; each pull
contracts by the `PULL_EVERY` steps' product (lazy regularisation, as StyleGAN2's R1)."""


class OnlineEWC(NoHooks):
    """Penalise moving the weights that mattered before the last boundary."""

    def __init__(
        self, lambda_: float = 100.0, decay: float = 0.99, gamma: float = 1.0, anchor_lag: int = 20
    ):
        if lambda_ < 0:
            raise ConfigError(f"ewc lambda_ must be >= 0, got {lambda_}")
        if not 0 <= decay < 1:
            raise ConfigError(f"ewc decay must be in [0, 1), got {decay}")
        if not 0 <= gamma <= 1:
            raise ConfigError(f"ewc gamma must be in [0, 1], got {gamma}")
        if anchor_lag < 0:
            raise ConfigError(f"ewc anchor_lag must be >= 0 updates, got {anchor_lag}")
        self.lambda_ = lambda_
        self.decay = decay
        self.gamma = gamma
        self.anchor_lag = anchor_lag
        self.steps = 0
        self.consolidations = 0
        self._running: dict[str, torch.Tensor] = {}  # times _scale: the running Fisher
        self._scale = 1.0
        self._fisher: dict[str, torch.Tensor] = {}
        self._anchor: dict[str, torch.Tensor] = {}
        self._weight: dict[str, torch.Tensor] = {}  # lambda F
        self._pull: dict[str, torch.Tensor] = {}  # lambda F theta*
        self._value = torch.zeros(())
        self._calls = 0  # penalty calls since the last consolidation
        # Snapshots {"steps", "params", "running"}: `_lagged` is the older, used at a boundary.
        self._recent: dict[str, Any] | None = None
        self._lagged: dict[str, Any] | None = None
        self._placed = True
        self._learning_rate: Callable[[], float] | None = None  # see `step_with`
        self._pull_every = PULL_EVERY
        self._rate: list[torch.Tensor] = []  # a pull's lerp weight at `_rate_lr`
        self._rate_lr: float | None = None
        self._named: list[tuple[str, nn.Parameter]] = []  # the model's trainable parameters
        self._named_of: int | None = None  # id of the model `_named` lists

    def step_with(self, learning_rate: Callable[[], float], every: int = PULL_EVERY) -> None:
        """Take the penalty as a step on the weights, at `learning_rate()`, every `every`
        steps: only valid when the optimizer is plain SGD (no momentum, weight decay or other
        penalty) with that rate. `every=1` applies exactly the update of the penalty's
        gradient; larger, the same contraction towards the anchor for fewer passes."""
        if every < 1:
            raise ConfigError(f"ewc pull every must be >= 1 step, got {every}")
        self._learning_rate = learning_rate
        self._pull_every = every

    @property
    def steps_weights(self) -> bool:
        """Whether the penalty is taken as a step on the weights (`step_with`)."""
        return self._learning_rate is not None

    def _parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        if self._named_of != id(model):
            self._named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            self._named_of = id(model)
        return self._named

    def after_backward(self, model: nn.Module) -> None:
        """Fold this step's squared task-loss gradient into the running Fisher.

        The running Fisher is `_scale * _running`: decaying it is a scalar multiply, so a
        step is one pass, `_running += (1 - decay) / _scale * g^2`, folded back into the
        tensors when `_scale` gets small.
        """
        self._place(model)
        self.steps += 1
        named = [(name, p) for name, p in self._parameters(model) if p.grad is not None]
        if any(name not in self._running for name, _ in named):
            self._running.update(
                (name, torch.zeros_like(p)) for name, p in named if name not in self._running
            )
        running = [self._running[name] for name, _ in named]
        grads = [cast(torch.Tensor, param.grad) for _, param in named]
        with torch.no_grad():
            self._scale *= self.decay
            if self._scale < RESCALE_BELOW:  # also every step when decay is 0
                torch._foreach_mul_(list(self._running.values()), self._scale)
                self._scale = 1.0
            weight = (1 - self.decay) / self._scale
            torch._foreach_addcmul_(running, grads, grads, value=weight)
        if self.anchor_lag and self.steps % self.anchor_lag == 0:
            self._lagged, self._recent = self._recent, self._snapshot(model)

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """Apply `lambda/2 * sum F (theta - theta*)^2`: add its gradient, `lambda F theta -
        lambda F theta*`, to `.grad`, or under `step_with` step the weights by it; return
        its value (0-dim, no graph, at most `PENALTY_VALUE_EVERY` steps old), or None
        before the first consolidation.
        """
        if not self._anchor or not self.lambda_:
            return None
        self._place(model)
        named = [(name, p) for name, p in self._parameters(model) if name in self._anchor]
        params: list[torch.Tensor] = [param for _, param in named]
        weight = [self._weight[name] for name, _ in named]
        anchor = [self._anchor[name] for name, _ in named]
        with torch.no_grad():
            if self._calls % PENALTY_VALUE_EVERY == 0:
                moved = torch._foreach_sub(params, anchor)
                squares = torch._foreach_mul(moved, moved)
                products = torch._foreach_mul(squares, weight)
                self._value = 0.5 * torch.stack([p.sum() for p in products]).sum()
            self._calls += 1
            if self._learning_rate is not None:
                if self.steps % self._pull_every:
                    return self._value
                lr = self._learning_rate()
                if lr != self._rate_lr:  # per consolidation, or when a schedule moves lr
                    # k steps of theta <- theta - r (theta - theta*) move it by 1 - (1 - r)^k.
                    k = self._pull_every
                    self._rate = [1 - (1 - w * lr) ** k for w in weight]
                    self._rate_lr = lr
                torch._foreach_lerp_(params, anchor, self._rate)
                return self._value
            for param in (p for p in params if p.grad is None):  # unused in this forward
                param.grad = torch.zeros_like(param)
            grads = [cast(torch.Tensor, param.grad) for param in params]
            torch._foreach_addcmul_(grads, weight, params)
            torch._foreach_sub_(grads, [self._pull[name] for name, _ in named])
        return self._value

    def consolidate(self, model: nn.Module, boundary: Boundary) -> None:
        """Anchor at the weights; add the running Fisher to the consolidated one."""
        self._place(model)
        late = boundary.detected and self._lagged is not None
        source = self._lagged if late and self._lagged is not None else self._snapshot(model)
        steps = source["steps"]
        correction = 1 - self.decay**steps if steps else 1.0
        with torch.no_grad():
            for name, param in source["params"].items():
                running = source["running"].get(name)
                estimate = running / correction if running is not None else torch.zeros_like(param)
                previous = self._fisher.get(name)
                self._fisher[name] = (
                    estimate if previous is None else previous.mul(self.gamma).add_(estimate)
                )
                self._anchor[name] = param.clone()
        self._derive()
        self.consolidations += 1
        # Later boundaries must not anchor before this one.
        self._recent = self._lagged = None

    def _derive(self) -> None:
        """The penalty's factors `lambda F` and `lambda F theta*`, per consolidation."""
        with torch.no_grad():
            self._weight = {k: f.mul(self.lambda_) for k, f in self._fisher.items()}
            self._pull = {k: w.mul(self._anchor[k]) for k, w in self._weight.items()}
        self._calls = 0
        self._rate_lr = None

    def _snapshot(self, model: nn.Module) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "params": {name: param.detach().clone() for name, param in self._parameters(model)},
            "running": self._running_fisher(),
        }

    def _running_fisher(self) -> dict[str, torch.Tensor]:
        """The running estimate's true values (fresh tensors)."""
        with torch.no_grad():
            return {name: running.mul(self._scale) for name, running in self._running.items()}

    def fisher(self) -> dict[str, torch.Tensor]:
        """The consolidated diagonal Fisher, by parameter name (empty before a boundary)."""
        return dict(self._fisher)

    def _place(self, model: nn.Module) -> None:
        """Move restored tensors (loaded on the CPU) to their parameters' device, once."""
        if self._placed:
            return
        devices = {name: param.device for name, param in model.named_parameters()}
        tables = [self._running, self._fisher, self._anchor]
        for snapshot in (self._recent, self._lagged):
            if snapshot is not None:
                tables += [snapshot["params"], snapshot["running"]]
        for table in tables:
            for name, value in table.items():
                table[name] = value.to(devices.get(name, value.device))
        self._derive()
        self._placed = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "consolidations": self.consolidations,
            # As kept (times running_scale): a resumed run then steps exactly as this one.
            "running": {k: v.clone() for k, v in self._running.items()},
            "running_scale": self._scale,
            "fisher": {k: v.clone() for k, v in self._fisher.items()},
            "anchor": {k: v.clone() for k, v in self._anchor.items()},
            "recent": _copy(self._recent),
            "lagged": _copy(self._lagged),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.consolidations = int(state["consolidations"])
        self._running = {k: v.clone() for k, v in state["running"].items()}
        self._scale = float(state["running_scale"])
        self._fisher = {k: v.clone() for k, v in state["fisher"].items()}
        self._anchor = {k: v.clone() for k, v in state["anchor"].items()}
        self._recent = _copy(state["recent"])
        self._lagged = _copy(state["lagged"])
        self._placed = False


def _copy(snapshot: dict[str, Any] | None) -> dict[str, Any] | None:
    if snapshot is None:
        return None
    return {
        "steps": int(snapshot["steps"]),
        "params": {k: v.clone() for k, v in snapshot["params"].items()},
        "running": {k: v.clone() for k, v in snapshot["running"].items()},
    }
