"""Strategies: small parts with hooks the online loop calls in one documented order.

Per incoming batch the loop calls, for each of K steps:

1. `prepare(update)`: add rows (replay draws); never mutates its input;
2. forward, rows grouped by task, each group through `masks(task)` (weight masks
   multiplied in, logits outside the allowed classes pushed to the dtype's minimum);
3. backward of the cross-entropy, then `after_backward(model)`: `.grad` holds the task
   loss's gradient (online EWC's running Fisher reads it: no extra pass over data);
4. `penalty(model)`: extra loss terms: the strategy adds the term's gradient to `.grad`
   itself (in closed form, without a second backward pass) and returns its value;
5. `before_step(model)`: gradient masks (PackNet's frozen weights);
6. optimizer step, then `after_step(model)`: projections (PackNet restores frozen weights);

then once `after_update(batch)` with the arrivals to remember: those the noise filters
admitted (with `noise.memory_agreement`, only those the model already predicted as
labelled) and the samples re-admitted from quarantine. At a task boundary (task-id
change, detected drift, or every N samples on a stream with neither) the loop calls
`consolidate(model, boundary)` before learning the next batch. Strategies compose by
running in list order; `task_aware` ones need task ids (or detected boundaries) at
train and test time.

A strategy of your own is a factory in `learner/registry.py`'s `STRATEGIES`, or named by
path (`--strategy mypkg.parts:make`); it gets a `StrategyContext` and returns an object
with these hooks (subclass `NoHooks`, define the hooks it needs and its state).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from streamcl.ingest.schema import Batch
from streamcl.memory.buffer import ReplayBuffer
from streamcl.memory.retrieval import Interference


@dataclass(frozen=True)
class UpdateBatch:
    """Rows for one step; the first `num_new` are the arriving samples.

    features: `[N, *shape]` in the stream dtype on the CPU (the loop moves and scales
    them once, after every strategy has added its rows); labels, tasks: `[N]` int64.
    """

    features: torch.Tensor
    labels: torch.Tensor
    tasks: torch.Tensor
    num_new: int


@dataclass(frozen=True)
class TaskMasks:
    """What rows of one task may use in the forward pass.

    parameters: parameter name -> 0/1 mask of its shape, multiplied into the weight;
    classes: `[C]` bool, the logits such a row may predict (multi-head), or None for all.
    """

    parameters: dict[str, torch.Tensor] = field(default_factory=dict)
    classes: torch.Tensor | None = None


@dataclass(frozen=True)
class Boundary:
    """A task boundary, at stream index `sample` (the first sample of `next_task`, or for a
    detected one where the detector fired). reason: task | periodic | drift | new-class.
    """

    sample: int
    reason: str
    next_task: int

    @property
    def detected(self) -> bool:
        """True for a detector's boundary: it comes some samples after the change."""
        return self.reason in ("drift", "new-class")


class Strategy(Protocol):
    task_aware: ClassVar[bool]

    def prepare(self, update: UpdateBatch) -> UpdateBatch: ...

    def masks(self, task: int) -> TaskMasks | None: ...

    def after_backward(self, model: nn.Module) -> None: ...

    def penalty(self, model: nn.Module) -> torch.Tensor | None: ...

    def before_step(self, model: nn.Module) -> None: ...

    def after_step(self, model: nn.Module) -> None: ...

    def after_update(self, batch: Batch) -> None: ...

    def consolidate(self, model: nn.Module, boundary: Boundary) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NoHooks:
    """No-op hooks: a strategy defines only the ones it needs and inherits the rest."""

    task_aware: ClassVar[bool] = False

    def prepare(self, update: UpdateBatch) -> UpdateBatch:
        return update

    def masks(self, task: int) -> TaskMasks | None:
        return None

    def after_backward(self, model: nn.Module) -> None:
        return None

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def before_step(self, model: nn.Module) -> None:
        return None

    def after_step(self, model: nn.Module) -> None:
        return None

    def after_update(self, batch: Batch) -> None:
        return None

    def consolidate(self, model: nn.Module, boundary: Boundary) -> None:
        return None


class Naive(NoHooks):
    """Plain fine-tuning on arriving samples: the lower bound every strategy must beat."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class ExperienceReplay(NoHooks):
    """Experience replay (Chaudhry et al. 2019, "On Tiny Episodic Memories"):
    each step trains on the new samples plus `replay_size` draws from memory.
    """

    def __init__(
        self,
        buffer: ReplayBuffer,
        replay_size: int = 10,
        seed: int = 0,
        interference: Interference | None = None,
    ):
        if replay_size < 0:
            raise ValueError(f"replay_size must be >= 0, got {replay_size}")
        self.buffer = buffer
        self.interference = interference  # scores draws for `interfered` retrieval
        self.replay_size = replay_size
        self._gen = torch.Generator().manual_seed(seed)

    def prepare(self, update: UpdateBatch) -> UpdateBatch:
        if not len(self.buffer) or not self.replay_size:
            return update
        near = near_labels = None
        if self.buffer.retrieval.needs_index:  # draws around the arrivals
            near = update.features[: update.num_new].numpy()
            near_labels = update.labels[: update.num_new].numpy()
        draw = self.buffer.sample(self.replay_size, self._gen, near, near_labels, self.interference)
        return UpdateBatch(
            features=torch.cat([update.features, draw.features]),
            labels=torch.cat([update.labels, draw.labels]),
            tasks=torch.cat([update.tasks, draw.tasks]),
            num_new=update.num_new,
        )

    def after_update(self, batch: Batch) -> None:
        self.buffer.add(batch.features, batch.labels, batch.tasks)

    def consolidate(self, model: nn.Module, boundary: Boundary) -> None:
        self.buffer.consolidate()  # the model moved: re-embed the memory (if it follows it)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "generator": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self._gen.set_state(state["generator"])


def replay_buffer(strategies: list[Strategy]) -> ReplayBuffer | None:
    """The replay memory of the first replaying strategy, if any (for monitoring)."""
    for strategy in strategies:
        if isinstance(strategy, ExperienceReplay):
            return strategy.buffer
    return None
