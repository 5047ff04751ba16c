"""Replay retrieval: which stored slots a replay step draws.

- `uniform`: every item equally likely (plain experience replay).
- `class-balanced`: a class uniformly among those stored, then an item of it.
- `neighbours`: half the draws among the items nearest the incoming batch that carry
  *another* label than the arrival they are near, the rest uniform. Those are the items
  whose predictions the coming update is most likely to overwrite: a cheap, index-based
  stand-in for maximally interfered retrieval (Aljundi et al. 2019), which would need a
  virtual update and a forward pass over candidates per step.

A retrieval policy is an object with `needs_index` (True: the buffer must keep its FAISS
index and hands `draw` the incoming batch's embeddings) and `draw`; `RETRIEVALS` holds
them by name, and `package.module:function` names one of yours (called with no arguments).
Draws come from the generator handed in, so a policy keeps no state of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from streamcl.ingest.registry import Registry
from streamcl.memory.index import EmbeddingIndex

NEAR_CANDIDATES = 10
"""Nearest items searched per arrival for the `neighbours` policy."""


class Retrieval(Protocol):
    needs_index: bool

    def draw(
        self,
        n: int,
        labels: np.ndarray,
        generator: torch.Generator,
        index: EmbeddingIndex | None,
        queries: np.ndarray | None,
        query_labels: np.ndarray | None,
    ) -> torch.Tensor:
        """`[n]` int64 slots among `len(labels)` >= 1 stored items, `n` >= 1.

        labels: `[size]` of the stored items; index, queries `[B, D]`, query_labels `[B]`:
        the memory's index and the incoming batch's embeddings and labels, when
        `needs_index` and the caller has a batch (None otherwise).
        """
        ...


def draw_slots(
    retrieval: Retrieval,
    n: int,
    labels: np.ndarray,
    generator: torch.Generator,
    index: EmbeddingIndex | None = None,
    queries: np.ndarray | None = None,
    query_labels: np.ndarray | None = None,
) -> torch.Tensor:
    """`[n]` int64 slots by `retrieval` (`[0]`-shaped when the memory is empty or n < 1)."""
    if not len(labels) or n < 1:
        return torch.zeros(0, dtype=torch.int64)
    return retrieval.draw(n, labels, generator, index, queries, query_labels)


class Uniform:
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
        return torch.randint(0, len(labels), (n,), generator=generator)


class ClassBalanced:
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
        order = np.argsort(labels, kind="stable")
        classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        which = torch.randint(0, len(classes), (n,), generator=generator).numpy()
        offset = torch.rand(n, generator=generator, dtype=torch.float64).numpy() * counts[which]
        return torch.from_numpy(order[starts[which] + offset.astype(np.int64)])


class Neighbours:
    needs_index = True

    def draw(
        self,
        n: int,
        labels: np.ndarray,
        generator: torch.Generator,
        index: EmbeddingIndex | None,
        queries: np.ndarray | None,
        query_labels: np.ndarray | None,
    ) -> torch.Tensor:
        size = len(labels)
        if index is not None and queries is not None:
            near = _near_other_class(index, labels, queries, query_labels)
            if len(near):
                k = n // 2
                pick = torch.randint(0, len(near), (k,), generator=generator)
                rest = torch.randint(0, size, (n - k,), generator=generator)
                return torch.cat([torch.from_numpy(near)[pick], rest])
        return torch.randint(0, size, (n,), generator=generator)


def _near_other_class(
    index: EmbeddingIndex,
    labels: np.ndarray,
    queries: np.ndarray,
    query_labels: np.ndarray | None,
) -> np.ndarray:
    """Slots (with repeats: an item near several arrivals counts more) of other-class items."""
    _, slots = index.search(queries, min(NEAR_CANDIDATES, len(labels)))
    valid = (slots >= 0) & (slots < len(labels))
    if query_labels is not None:
        valid &= labels[slots.clip(0, len(labels) - 1)] != np.asarray(query_labels)[:, None]
    return slots[valid]


RETRIEVALS: Registry[Callable[[], Retrieval]] = Registry(
    "memory retrieval",
    {"uniform": Uniform, "class-balanced": ClassBalanced, "neighbours": Neighbours},
    required=("needs_index", "draw"),
)
"""Retrieval policies by name."""
