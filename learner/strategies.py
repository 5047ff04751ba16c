"""Strategies: small parts with hooks the online loop calls in one documented order.

Per incoming batch the loop calls, for each of K steps:
`prepare(update)` -> forward -> `penalty(model)` -> backward -> optimizer step;
then once `after_update(batch)`. Strategies compose by running in list order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ingest.schema import Batch
from memory.buffer import ReplayBuffer


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


class Strategy(Protocol):
    def prepare(self, update: UpdateBatch) -> UpdateBatch: ...

    def penalty(self, model: nn.Module) -> torch.Tensor | None: ...

    def after_update(self, batch: Batch) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Naive:
    """Plain fine-tuning on arriving samples: the lower bound every strategy must beat."""

    def prepare(self, update: UpdateBatch) -> UpdateBatch:
        return update

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_update(self, batch: Batch) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class ExperienceReplay:
    """Experience replay (Chaudhry et al. 2019, "On Tiny Episodic Memories"):
    each step trains on the new samples plus `replay_size` draws from memory.
    """

    def __init__(self, buffer: ReplayBuffer, replay_size: int = 10, seed: int = 0):
        if replay_size < 0:
            raise ValueError(f"replay_size must be >= 0, got {replay_size}")
        self.buffer = buffer
        self.replay_size = replay_size
        self._gen = torch.Generator().manual_seed(seed)

    def prepare(self, update: UpdateBatch) -> UpdateBatch:
        if not len(self.buffer) or not self.replay_size:
            return update
        draw = self.buffer.sample(self.replay_size, self._gen)
        return UpdateBatch(
            features=torch.cat([update.features, draw.features]),
            labels=torch.cat([update.labels, draw.labels]),
            tasks=torch.cat([update.tasks, draw.tasks]),
            num_new=update.num_new,
        )

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_update(self, batch: Batch) -> None:
        self.buffer.add(batch.features, batch.labels, batch.tasks)

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
