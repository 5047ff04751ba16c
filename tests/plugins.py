"""Plug-ins imported by path in tests: a strategy (`--strategy tests.plugins:make`), a memory
selector, a retrieval policy and a noise filter, each the smallest thing its interface allows.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch
from torch import nn

from streamcl.ingest.schema import Batch
from streamcl.learner.filters import ABSTAIN, FLAG, PASS
from streamcl.learner.registry import FilterContext, StrategyContext
from streamcl.learner.strategies import Boundary, NoHooks, UpdateBatch
from streamcl.memory.index import EmbeddingIndex
from streamcl.memory.store import ExemplarStore

BUILT: list[Frozen] = []
"""Every strategy `make` built, newest last (a test in this process reads its counts)."""


class Frozen(NoHooks):
    """Count the hook calls and zero every gradient before the step: the model never changes,
    so its accuracy on a group is the same at every evaluation point."""

    def __init__(self, context: StrategyContext):
        self.context = context
        self.calls: Counter[str] = Counter()

    def prepare(self, update: UpdateBatch) -> UpdateBatch:
        self.calls["prepare"] += 1
        return update

    def before_step(self, model: nn.Module) -> None:
        self.calls["before_step"] += 1
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter.grad.zero_()

    def after_update(self, batch: Batch) -> None:
        self.calls["after_update"] += 1
        self.calls["samples"] += len(batch)

    def consolidate(self, model: nn.Module, boundary: Boundary) -> None:
        self.calls["consolidate"] += 1

    def state_dict(self) -> dict[str, Any]:
        return {"calls": dict(self.calls)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = Counter(state["calls"])


def make(context: StrategyContext) -> Frozen:
    strategy = Frozen(context)
    BUILT.append(strategy)
    return strategy


def not_a_strategy(context: StrategyContext) -> int:
    return 3


class Fifo:
    """Overwrite the oldest slot once full: the memory holds the latest `capacity` items."""

    def __init__(self) -> None:
        self.seen = 0

    def slots(self, store: ExemplarStore, labels: np.ndarray) -> list[int]:
        out = [(self.seen + i) % store.capacity for i in range(len(labels))]
        self.seen += len(labels)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])


def fifo(num_classes: int, seed: int) -> Fifo:
    return Fifo()


class Smallest:
    """Replay the item of the smallest stored label, every draw."""

    needs_index = False

    def draw(
        self,
        n: int,
        labels: np.ndarray,
        generator: torch.Generator,
        index: EmbeddingIndex | None,
        queries: np.ndarray | None,
        query_labels: np.ndarray | None,
    ) -> torch.Tensor:
        return torch.full((n,), int(np.argmin(labels)), dtype=torch.int64)


class OddLabels:
    """Flag every odd label; abstain on label 0."""

    name = "odd"

    def judge(
        self, losses: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> np.ndarray:
        verdict = np.where(labels.cpu().numpy() % 2 == 1, FLAG, PASS)
        return np.where(labels.cpu().numpy() == 0, ABSTAIN, verdict)

    def observe(
        self,
        losses: torch.Tensor,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        admitted: np.ndarray,
    ) -> None:
        return None

    def restart(self) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def odd_labels(context: FilterContext) -> OddLabels:
    return OddLabels()
