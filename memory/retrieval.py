"""Replay retrieval: which stored slots a replay step draws.

- `uniform`: every item equally likely (plain experience replay).
- `class-balanced`: a class uniformly among those stored, then an item of it.
- `neighbours`: half the draws among the items nearest the incoming batch that carry
  *another* label than the arrival they are near, the rest uniform. Those are the items
  whose predictions the coming update is most likely to overwrite: a cheap, index-based
  stand-in for maximally interfered retrieval (Aljundi et al. 2019), which would need a
  virtual update and a forward pass over candidates per step.
- `interfered`: maximally interfered retrieval itself. The items nearest the incoming
  batch (`NEAR_CANDIDATES` per arrival, any label) and as many drawn uniformly are the
  candidates; an `Interference` callable from the learner scores each by how much its
  loss would rise under a virtual update on the batch, and the `n // 2` highest are
  replayed, the rest of the draws uniform.

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

Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""Candidates' features `[m, *shape]` and labels `[m]` -> `[m]` loss increase."""
Interference = Callable[[np.ndarray, np.ndarray], Scorer]
"""The incoming batch's features and labels -> the `Scorer` of its virtual update."""
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


class Interfered(Uniform):
    """Maximally interfered retrieval: the buffer draws through `interfered_slots` with
    the learner's `Interference`; without one (no model to score with) draws are uniform."""

    needs_index = True


def interfered_slots(
    n: int,
    index: EmbeddingIndex,
    size: int,
    queries: np.ndarray,
    score: Callable[[np.ndarray], np.ndarray],
    generator: torch.Generator,
) -> torch.Tensor:
    """Half the draws: the candidates with the highest `score(slots)`, candidates being the
    items near `queries` plus as many drawn uniformly (MIR's own candidates are uniform:
    near-batch items alone left classes far from the batch unreplayed); the rest uniform."""
    _, slots = index.search(queries, min(NEAR_CANDIDATES, size))
    near = slots[(slots >= 0) & (slots < size)]
    anywhere = torch.randint(0, size, (len(near),), generator=generator).numpy()
    candidates = np.unique(np.concatenate([near, anywhere]))
    top = candidates[np.argsort(-score(candidates), kind="stable")[: n // 2]].astype(np.int64)
    rest = torch.randint(0, size, (n - len(top),), generator=generator)
    return torch.cat([torch.from_numpy(top), rest])


RETRIEVALS: Registry[Callable[[], Retrieval]] = Registry(
    "memory retrieval",
    {
        "uniform": Uniform,
        "class-balanced": ClassBalanced,
        "neighbours": Neighbours,
        "interfered": Interfered,
    },
    required=("needs_index", "draw"),
)
"""Retrieval policies by name."""
