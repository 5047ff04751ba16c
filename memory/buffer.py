"""The replay buffer: an `ExemplarStore` composed with a `Selector`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ingest.errors import ConfigError
from memory.selectors import SKIP, ClassBalancedSelector, Policy, ReservoirSelector, Selector
from memory.store import ExemplarStore


@dataclass(frozen=True)
class Draw:
    """Exemplars drawn for replay: features `[n, *shape]` (stream dtype), labels/tasks `[n]`."""

    features: torch.Tensor
    labels: torch.Tensor
    tasks: torch.Tensor


class ReplayBuffer:
    """Fixed item budget; `add` offers exemplars to the selector, `sample` draws uniformly."""

    def __init__(
        self,
        capacity: int,
        feature_shape: tuple[int, ...],
        dtype: str = "uint8",
        policy: Policy = "class-balanced",
        num_classes: int = 10,
        seed: int = 0,
    ):
        if capacity < 1:
            raise ConfigError(f"memory capacity must be >= 1 item, got {capacity}")
        if policy not in ("reservoir", "class-balanced"):
            raise ConfigError(f"memory policy must be reservoir or class-balanced, got {policy!r}")
        self.policy = policy
        self.store = ExemplarStore(capacity, feature_shape, dtype)
        self.selector: Selector = (
            ReservoirSelector(seed)
            if policy == "reservoir"
            else ClassBalancedSelector(num_classes, seed)
        )

    def __len__(self) -> int:
        return self.store.size

    @property
    def capacity(self) -> int:
        return self.store.capacity

    @property
    def nbytes(self) -> int:
        return self.store.nbytes

    def add(self, features: np.ndarray, labels: np.ndarray, tasks: np.ndarray) -> int:
        """Offer `[B, *shape]` exemplars; returns how many were stored."""
        # A slot may be chosen twice in one batch; the later arrival wins, as if sequential.
        latest = {slot: i for i, slot in enumerate(self.selector.slots(self.store, labels))}
        latest.pop(SKIP, None)
        if latest:
            slots = np.fromiter(latest.keys(), np.int64, len(latest))
            rows = np.fromiter(latest.values(), np.int64, len(latest))
            self.store.write(slots, features[rows], labels[rows], tasks[rows])
        return len(latest)

    def sample(self, n: int, generator: torch.Generator) -> Draw:
        """Draw `n` exemplars uniformly with replacement; empty buffer gives an empty draw."""
        size = self.store.size
        slots = torch.randint(0, max(size, 1), (n if size else 0,), generator=generator)
        return Draw(*self.store.read(slots))

    def class_counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.store.labels[: self.store.size], minlength=num_classes)

    def state_dict(self) -> dict[str, Any]:
        return {"store": self.store.state_dict(), "selector": self.selector.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.store.load_state_dict(state["store"])
        self.selector.load_state_dict(state["selector"])
