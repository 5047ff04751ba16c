"""Selectors decide, per arriving exemplar, which slot it overwrites (or that it is skipped).

Both draw from their own seeded `torch.Generator`, saved in `state_dict`, so a
restored buffer makes the same choices as an uninterrupted one. `SELECTORS` holds them by
name; `package.module:function` names one of yours, called as
`function(num_classes=..., seed=...)` and returning a `Selector`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from streamcl.ingest.registry import Registry
from streamcl.memory.store import ExemplarStore

SKIP = -1


class Selector(Protocol):
    def slots(self, store: ExemplarStore, labels: np.ndarray) -> list[int]:
        """Slot per arriving label (`SKIP` to drop it), applied in order by the caller."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ReservoirSelector:
    """Uniform reservoir sampling (Vitter's algorithm R): every item seen is kept w.p. cap/seen."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.seen = 0
        self._gen = torch.Generator().manual_seed(seed)

    def slots(self, store: ExemplarStore, labels: np.ndarray) -> list[int]:
        draws = torch.rand(len(labels), generator=self._gen, dtype=torch.float64).tolist()
        out = []
        size = store.size
        for u in draws:
            self.seen += 1
            if size < store.capacity:
                out.append(size)
                size += 1
                continue
            j = int(u * self.seen)
            out.append(j if j < store.capacity else SKIP)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "generator": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])
        self._gen.set_state(state["generator"])


class ClassBalancedSelector:
    """Keep classes equally represented: when full, a newcomer of an under-represented
    class evicts a random exemplar of the largest class; a newcomer of a largest class
    replaces a random exemplar of its own class with reservoir probability count/seen.

    Per-class slot lists make each decision O(classes); their order is part of the
    state so a restored selector evicts exactly what an uninterrupted one would.
    """

    def __init__(self, num_classes: int, seed: int = 0):
        self.num_classes = num_classes
        self.seed = seed
        self.seen_per_class = [0] * num_classes
        self.members: list[list[int]] = [[] for _ in range(num_classes)]
        self._gen = torch.Generator().manual_seed(seed)

    def slots(self, store: ExemplarStore, labels: np.ndarray) -> list[int]:
        draws = torch.rand((len(labels), 2), generator=self._gen, dtype=torch.float64).tolist()
        out = []
        members, seen = self.members, self.seen_per_class
        counts = [len(m) for m in members]
        size = sum(counts)
        for label, (u_slot, u_keep) in zip(labels.tolist(), draws, strict=True):
            seen[label] += 1
            if size < store.capacity:
                slot = size
                size += 1
            else:
                largest = max(counts)
                if counts[label] < largest:
                    victims = [c for c, n in enumerate(counts) if n == largest]
                    victim = victims[int(u_keep * len(victims))]
                elif u_keep * seen[label] < counts[label]:
                    victim = label
                else:
                    out.append(SKIP)
                    continue
                # Swap-remove: O(1), and deterministic given the list order.
                pool = members[victim]
                k = int(u_slot * len(pool))
                slot = pool[k]
                pool[k] = pool[-1]
                pool.pop()
                counts[victim] -= 1
            members[label].append(slot)
            counts[label] += 1
            out.append(slot)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "seen_per_class": torch.tensor(self.seen_per_class, dtype=torch.int64),
            "member_counts": torch.tensor([len(m) for m in self.members], dtype=torch.int64),
            "member_slots": torch.tensor([s for m in self.members for s in m], dtype=torch.int64),
            "generator": self._gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen_per_class = state["seen_per_class"].tolist()
        slots = state["member_slots"].tolist()
        self.members, start = [], 0
        for count in state["member_counts"].tolist():
            self.members.append(slots[start : start + count])
            start += count
        self._gen.set_state(state["generator"])


def reservoir(num_classes: int, seed: int) -> Selector:
    return ReservoirSelector(seed)


def class_balanced(num_classes: int, seed: int) -> Selector:
    return ClassBalancedSelector(num_classes, seed)


SELECTORS: Registry[Callable[..., Selector]] = Registry(
    "memory selector",
    {"reservoir": reservoir, "class-balanced": class_balanced},
    required=("slots", "state_dict", "load_state_dict"),
)
"""Memory selectors (the memory's `policy`) by name."""
