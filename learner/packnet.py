"""Parameter isolation for streams: PackNet (Mallya & Lazebnik 2018), one task at a time.

An explicit state machine, saved whole with the model:

    waiting --first batch--> learning(task k) --boundary--> prune and freeze k --> learning(k+1)

- While task k is learned, gradients of weights owned by earlier tasks are zeroed
  and, after the optimizer step, their values are restored (momentum, Adam or weight
  decay cannot move them either). Free weights train.
- At k's boundary the free weights k *used* (non-zero gradient at some step) are its
  candidates. Of each weight tensor's candidates, the `1 - prune_fraction` of largest
  magnitude become k's, frozen from now on; the rest are released (set to zero) for
  later tasks. One-dimensional parameters (biases) are kept whole: pruning a bias by
  magnitude has no meaning. Free weights k never used stay free (the heads of other
  tasks' classes, with `multi_head`).
- At inference a row of task k sees only the weights owned by tasks up to k; a row of
  the task being learned (or of an unknown one) sees every weight. With `multi_head`
  a row's logits are restricted to the classes its task has shown.

`owner[name]` (int16, -1 for free) says which task owns each weight: it is the masks.
There is no retraining pass after pruning (a stream does not come back), so pruning
costs the last task a little accuracy; a task id seen again after its boundary is
not learned further (its weights stay frozen).
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from streamcl.ingest.errors import ConfigError
from streamcl.ingest.schema import NO_TASK
from streamcl.learner.strategies import Boundary, NoHooks, TaskMasks, UpdateBatch

log = logging.getLogger(__name__)
Phase = Literal["waiting", "learning", "full"]


class PackNet(NoHooks):
    """Prune, freeze and mask per task; task ids (or detected boundaries) at train and test."""

    task_aware: ClassVar[bool] = True

    def __init__(self, num_classes: int, prune_fraction: float = 0.5, multi_head: bool = True):
        if num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        if not 0 < prune_fraction < 1:
            raise ConfigError(f"packnet prune_fraction must be in (0, 1), got {prune_fraction}")
        self.num_classes = num_classes
        self.prune_fraction = prune_fraction
        self.multi_head = multi_head
        self.phase: Phase = "waiting"
        self.current = NO_TASK
        self.order: list[int] = []
        self._owner: dict[str, torch.Tensor] = {}
        # Sum of |gradient| per weight since the last boundary: "used" is "> 0". A float
        # sum, because boolean tensor ops are several times slower on the CPU.
        self._activity: dict[str, torch.Tensor] = {}
        self._classes: dict[int, torch.Tensor] = {}
        # Derived from `owner` and the model after a boundary or a load: per parameter with
        # owned weights, `free` (1.0 where free) and `frozen` (owned values, 0.0 elsewhere);
        # the owned values equal the model's, so they need not be saved.
        self._free: dict[str, torch.Tensor] = {}
        self._frozen: dict[str, torch.Tensor] = {}
        self._derived = False
        self._mask_cache: dict[int, dict[str, torch.Tensor]] = {}

    def prepare(self, update: UpdateBatch) -> UpdateBatch:
        """Note which classes each task shows (the heads); enter `learning` on first data."""
        tasks, labels = update.tasks[: update.num_new], update.labels[: update.num_new]
        for task in torch.unique(tasks).tolist():
            seen = self._classes.setdefault(
                int(task), torch.zeros(self.num_classes, dtype=torch.bool)
            )
            seen[labels[tasks == task]] = True
        if self.phase == "waiting" and len(tasks):
            self.current = int(tasks[-1])
            self.phase = "learning"
        return update

    def masks(self, task: int) -> TaskMasks | None:
        classes = self._classes.get(task) if self.multi_head else None
        if classes is not None and not bool(classes.any()):
            classes = None
        parameters: dict[str, torch.Tensor] = {}
        if task in self.order:
            index = self.order.index(task)
            if index not in self._mask_cache:
                self._mask_cache[index] = {
                    name: ((owner >= 0) & (owner <= index)).float()
                    for name, owner in self._owner.items()
                }
            parameters = self._mask_cache[index]
        if classes is None and not parameters:
            return None
        return TaskMasks(parameters, classes)

    def before_step(self, model: nn.Module) -> None:
        """Record which free weights this task uses; zero the gradients of frozen ones."""
        self._ensure(model)
        for name, param in model.named_parameters():
            if param.grad is None or name not in self._owner:
                continue
            self._activity[name].add_(param.grad.abs())
            if name in self._free:
                param.grad.mul_(self._free[name])

    def after_step(self, model: nn.Module) -> None:
        """Put frozen weights back where any optimizer state may have moved them."""
        if not self._free:
            return
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in self._free:
                    torch.addcmul(self._frozen[name], param, self._free[name], out=param)

    def consolidate(self, model: nn.Module, boundary: Boundary) -> None:
        """The current task ends: give it its largest used free weights, release the rest."""
        next_task = boundary.next_task
        if self.phase == "waiting":
            self.current = next_task
            return
        self._ensure(model)
        if self.current in self.order:
            self.current = next_task
            return
        index = len(self.order)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name not in self._owner:
                    continue
                owner, activity = self._owner[name], self._activity[name]
                candidates = (owner < 0) & (activity > 0)
                keep = self._keep(param, candidates) if param.dim() > 1 else candidates
                owner[keep] = index
                param[candidates & ~keep] = 0.0
                activity.zero_()
        self.order.append(self.current)
        log.info(
            "packnet task frozen task=%d owned=%s next_task=%d",
            self.current,
            {name: int((owner == index).sum()) for name, owner in self._owner.items()},
            next_task,
        )
        self.current = next_task
        self.phase = "learning" if self._has_free_weights() else "full"
        if self.phase == "full":
            log.warning(
                "packnet has no free weights left: task %d and later learn nothing", next_task
            )
        self._mask_cache.clear()
        self._derived = False
        self._ensure(model)

    def _keep(self, param: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """The `1 - prune_fraction` largest-magnitude candidates (ties: lower index first)."""
        where = candidates.flatten().nonzero().squeeze(1)
        n_keep = math.ceil((1 - self.prune_fraction) * len(where))
        scores = param.detach().abs().flatten()[where]
        chosen = where[torch.argsort(scores, descending=True, stable=True)[:n_keep]]
        keep = torch.zeros(candidates.numel(), dtype=torch.bool, device=candidates.device)
        keep[chosen] = True
        return keep.view_as(candidates)

    def _has_free_weights(self) -> bool:
        return any(
            bool((owner < 0).any()) for name, owner in self._owner.items() if owner.dim() > 1
        )

    def _ensure(self, model: nn.Module) -> None:
        """Create the ownership maps on first use, place restored ones on the model's device,
        and derive the frozen masks and values (after a consolidation or a load)."""
        if self._derived:
            return
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if name not in self._owner:
                self._owner[name] = torch.full_like(param, -1, dtype=torch.int16)
                self._activity[name] = torch.zeros_like(param)
            elif self._owner[name].device != param.device:
                self._owner[name] = self._owner[name].to(param.device)
                self._activity[name] = self._activity[name].to(param.device)
                self._mask_cache.clear()
        self._free, self._frozen = {}, {}
        for name, param in model.named_parameters():
            owned = self._owner[name] >= 0 if name in self._owner else None
            if owned is not None and bool(owned.any()):
                self._free[name] = (~owned).to(param.dtype)
                self._frozen[name] = param.detach() * owned.to(param.dtype)
        self._derived = True

    def state_dict(self) -> dict[str, Any]:
        tasks = sorted(self._classes)
        return {
            "phase": self.phase,
            "current": self.current,
            "order": torch.tensor(self.order, dtype=torch.int64),
            "owner": {name: owner.cpu().clone() for name, owner in self._owner.items()},
            "used": {name: (activity > 0).cpu() for name, activity in self._activity.items()},
            "class_tasks": torch.tensor(tasks, dtype=torch.int64),
            "classes": torch.stack([self._classes[t] for t in tasks])
            if tasks
            else torch.zeros(0, self.num_classes, dtype=torch.bool),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        phase = state["phase"]
        if phase not in ("waiting", "learning", "full"):
            raise ConfigError(f"packnet state has an unknown phase {phase!r}")
        self.phase = phase
        self.current = int(state["current"])
        self.order = [int(t) for t in state["order"].tolist()]
        self._owner = {name: owner.clone() for name, owner in state["owner"].items()}
        self._activity = {name: used.float() for name, used in state["used"].items()}
        self._classes = {
            int(t): row.clone()
            for t, row in zip(state["class_tasks"].tolist(), state["classes"], strict=True)
        }
        self._free, self._frozen = {}, {}
        self._derived = False
        self._mask_cache = {}
