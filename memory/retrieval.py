"""Replay retrieval: which stored slots a replay step draws.

- `uniform`: every item equally likely (plain experience replay).
- `class-balanced`: a class uniformly among those stored, then an item of it.
- `neighbours`: half the draws among the items nearest the incoming batch that carry
  *another* label than the arrival they are near, the rest uniform. Those are the items
  whose predictions the coming update is most likely to overwrite: a cheap, index-based
  stand-in for maximally interfered retrieval (Aljundi et al. 2019), which would need a
  virtual update and a forward pass over candidates per step.
- `interfered`: maximally interfered retrieval itself. The items nearest the incoming
  batch (`NEAR_CANDIDATES` per arrival, any label) are the candidates; an
  `Interference` callable from the learner scores each by how much its loss would rise
  under a virtual update on the batch, and the `n` highest are replayed (uniform
  draws fill in when there are fewer candidates).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from streamcl.memory.index import EmbeddingIndex

Retrieval = Literal["uniform", "class-balanced", "neighbours", "interfered"]
Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""Candidates' features `[m, *shape]` and labels `[m]` -> `[m]` loss increase."""
Interference = Callable[[np.ndarray, np.ndarray], Scorer]
"""The incoming batch's features and labels -> the `Scorer` of its virtual update."""
NEAR_CANDIDATES = 10
"""Nearest items searched per arrival for the `neighbours` policy."""


def draw_slots(
    policy: Retrieval,
    n: int,
    labels: np.ndarray,
    generator: torch.Generator,
    index: EmbeddingIndex | None = None,
    queries: np.ndarray | None = None,
    query_labels: np.ndarray | None = None,
) -> torch.Tensor:
    """`[n]` int64 slots among the `len(labels)` stored items (`[0]`-shaped when empty).

    labels: `[size]` of the stored items; queries `[B, D]`, query_labels `[B]`: the
    incoming batch's embeddings and labels (for `neighbours`).
    """
    size = len(labels)
    if not size or n < 1:
        return torch.zeros(0, dtype=torch.int64)
    if policy == "class-balanced":
        return _class_balanced(n, labels, generator)
    if policy == "neighbours" and index is not None and queries is not None:
        near = _near_other_class(index, labels, queries, query_labels)
        if len(near):
            k = n // 2
            pick = torch.randint(0, len(near), (k,), generator=generator)
            rest = torch.randint(0, size, (n - k,), generator=generator)
            return torch.cat([torch.from_numpy(near)[pick], rest])
    return torch.randint(0, size, (n,), generator=generator)


def _class_balanced(n: int, labels: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    order = np.argsort(labels, kind="stable")
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    which = torch.randint(0, len(classes), (n,), generator=generator).numpy()
    offset = torch.rand(n, generator=generator, dtype=torch.float64).numpy() * counts[which]
    return torch.from_numpy(order[starts[which] + offset.astype(np.int64)])


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


def interfered_slots(
    n: int,
    index: EmbeddingIndex,
    size: int,
    queries: np.ndarray,
    score: Callable[[np.ndarray], np.ndarray],
    generator: torch.Generator,
) -> torch.Tensor:
    """The `n` candidates near `queries` with the highest `score(slots)`, topped up with
    uniform draws among the `size` items when fewer are found."""
    _, slots = index.search(queries, min(NEAR_CANDIDATES, size))
    candidates = np.unique(slots[(slots >= 0) & (slots < size)])
    top = np.zeros(0, dtype=np.int64)
    if len(candidates):
        top = candidates[np.argsort(-score(candidates), kind="stable")[:n]].astype(np.int64)
    rest = torch.randint(0, size, (n - len(top),), generator=generator)
    return torch.cat([torch.from_numpy(top), rest])
