"""The replay buffer: an `ExemplarStore` composed with a `Selector`, optionally indexed.

With an `embed` callable (handed over by the learner; memory imports nothing of it)
every stored item also has a unit embedding in a FAISS `EmbeddingIndex` whose ids are
the store's slots. The index serves neighbour queries (the kNN noise filter),
near-duplicate-aware insertion, neighbour-informed replay draws and nearest-neighbour
prediction. Embeddings are a function of the stored features alone (the learner hands
over pooled inputs, not model features), so they never go stale and need no refresh;
a checkpoint holds the items, and loading re-embeds them and rebuilds the index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ingest.errors import ConfigError
from memory.index import EMPTY, EmbeddingIndex
from memory.nearest import Head, class_means, knn_scores, ncm_scores
from memory.retrieval import Retrieval, draw_slots
from memory.selectors import SKIP, ClassBalancedSelector, Policy, ReservoirSelector, Selector
from memory.store import ExemplarStore

Embed = Callable[[np.ndarray], np.ndarray]
"""`[n, *shape]` features in the stream dtype -> `[n, D]` float32 unit rows."""

DEDUP_NEIGHBOURS = 8
"""Nearest items searched for an arrival's nearest same-class item (duplicate check)."""
DEDUP_MOMENTUM = 0.99
"""Per-class running mean of arrivals' distance to their nearest same-class item."""


@dataclass(frozen=True)
class Draw:
    """Exemplars drawn for replay: features `[n, *shape]` (stream dtype), labels/tasks `[n]`."""

    features: torch.Tensor
    labels: torch.Tensor
    tasks: torch.Tensor


class ReplayBuffer:
    """Fixed item budget; `add` offers exemplars to the selector, `sample` draws.

    retrieval: how `sample` draws (memory/retrieval.py); `neighbours` needs the index.
    dedup: an arrival whose nearest same-class item is closer than `dedup` times the
    class's typical such distance refreshes (overwrites) that item instead of taking a
    slot through the selector; 0 turns it off. Needs the index.
    """

    def __init__(
        self,
        capacity: int,
        feature_shape: tuple[int, ...],
        dtype: str = "uint8",
        policy: Policy = "class-balanced",
        num_classes: int = 10,
        seed: int = 0,
        embed: Embed | None = None,
        retrieval: Retrieval = "uniform",
        dedup: float = 0.0,
        index_device: Literal["cpu", "cuda"] = "cpu",
    ):
        if capacity < 1:
            raise ConfigError(f"memory capacity must be >= 1 item, got {capacity}")
        if policy not in ("reservoir", "class-balanced"):
            raise ConfigError(f"memory policy must be reservoir or class-balanced, got {policy!r}")
        if retrieval not in ("uniform", "class-balanced", "neighbours"):
            raise ConfigError(
                f"memory retrieval must be uniform, class-balanced or neighbours, got {retrieval!r}"
            )
        if not 0.0 <= dedup < 1.0:
            raise ConfigError(f"memory dedup must be in [0, 1), got {dedup}")
        if embed is None and (retrieval == "neighbours" or dedup > 0):
            raise ConfigError(f"memory retrieval {retrieval!r} / dedup {dedup} need an embedding")
        self.policy = policy
        self.retrieval: Retrieval = retrieval
        self.dedup = dedup
        self.num_classes = num_classes
        self.store = ExemplarStore(capacity, feature_shape, dtype)
        self.selector: Selector = (
            ReservoirSelector(seed)
            if policy == "reservoir"
            else ClassBalancedSelector(num_classes, seed)
        )
        self.embed = embed
        self.index: EmbeddingIndex | None = None
        if embed is not None:
            dim = embed(np.zeros((1, *feature_shape), dtype=dtype)).shape[1]
            self.index = EmbeddingIndex(capacity, dim, index_device)
        self.typical = np.zeros(num_classes)  # running nearest same-class distance per class
        self.refreshed = 0  # arrivals that refreshed a near duplicate instead of a slot

    def __len__(self) -> int:
        return self.store.size

    @property
    def capacity(self) -> int:
        return self.store.capacity

    @property
    def nbytes(self) -> int:
        return self.store.nbytes + (self.index.nbytes if self.index is not None else 0)

    def add(self, features: np.ndarray, labels: np.ndarray, tasks: np.ndarray) -> int:
        """Offer `[B, *shape]` exemplars; returns how many were stored (refreshes included)."""
        embeddings = self.embed(features) if self.embed is not None else None
        refresh = np.full(len(labels), SKIP, dtype=np.int64)
        if self.dedup > 0 and embeddings is not None:
            refresh = self._near_duplicates(embeddings, labels)
        fresh = np.flatnonzero(refresh == SKIP)
        # Refreshes first, then the selector's choices in arrival order: a slot chosen
        # twice keeps the later choice (as if sequential), and a selector's choice always
        # beats a refresh, so the selector's bookkeeping of what each slot holds stays true.
        latest = {int(refresh[i]): int(i) for i in np.flatnonzero(refresh != SKIP)}
        chosen = self.selector.slots(self.store, labels[fresh])
        for i, slot in zip(fresh.tolist(), chosen, strict=True):
            if slot != SKIP:
                latest[slot] = i
        if latest:
            slots = np.fromiter(latest.keys(), np.int64, len(latest))
            rows = np.fromiter(latest.values(), np.int64, len(latest))
            self.store.write(slots, features[rows], labels[rows], tasks[rows])
            if self.index is not None and embeddings is not None:
                self.index.write(slots, embeddings[rows])
        return len(latest)

    def _near_duplicates(self, embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Per row, the slot of a near-duplicate same-class item to refresh, else `SKIP`.

        Judged against the memory before this batch is written: two near duplicates
        arriving in one batch are not caught.
        """
        out = np.full(len(labels), SKIP, dtype=np.int64)
        if self.index is None or not self.store.size:
            return out
        scores, slots = self.index.search(embeddings, DEDUP_NEIGHBOURS)
        stored = np.where(slots >= 0, self.store.labels[slots.clip(0)], EMPTY)
        for i, label in enumerate(labels.tolist()):
            same = np.flatnonzero(stored[i] == label)
            if not len(same):
                continue
            distance = max(0.0, 1.0 - float(scores[i, same[0]]))
            typical = self.typical[label]
            if typical > 0 and distance < self.dedup * typical:
                out[i] = slots[i, same[0]]
            self.typical[label] = (
                distance
                if typical == 0
                else DEDUP_MOMENTUM * typical + (1 - DEDUP_MOMENTUM) * distance
            )
        self.refreshed += int((out != SKIP).sum())
        return out

    def sample(
        self,
        n: int,
        generator: torch.Generator,
        near: np.ndarray | None = None,
        near_labels: np.ndarray | None = None,
    ) -> Draw:
        """Draw `n` exemplars with replacement by the buffer's retrieval policy.

        near, near_labels: the incoming batch `[B, *shape]` and `[B]`, which the
        `neighbours` policy draws around; ignored by the others. Empty buffer: empty draw.
        """
        queries = None
        if self.retrieval == "neighbours" and near is not None and self.embed is not None:
            queries = self.embed(near)
        slots = draw_slots(
            self.retrieval,
            n,
            self.store.labels[: self.store.size],
            generator,
            self.index,
            queries,
            near_labels,
        )
        return Draw(*self.store.read(slots))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The `k` items nearest each query embedding `[B, D]`: similarities and labels `[B, k]`.

        Missing neighbours (fewer than `k` items) have label -1 and similarity -inf.
        """
        if self.index is None:
            raise ConfigError("memory has no embedding index: build it with an embed callable")
        scores, slots = self.index.search(queries, k)
        missing = slots < 0
        labels = np.where(missing, -1, self.store.labels[slots.clip(0)])
        return np.where(missing, -np.inf, scores).astype(np.float32), labels

    def predict_scores(self, features: np.ndarray, head: Head, k: int = 10) -> np.ndarray:
        """`[N, C]` class scores for `[N, *shape]` features from the stored items alone:
        `ncm` (nearest class mean) or `knn` (similarity-weighted vote of `k` neighbours)."""
        if self.index is None or self.embed is None:
            raise ConfigError("memory has no embedding index: build it with an embed callable")
        queries = self.embed(features)
        if head == "ncm":
            size = self.store.size
            kept = self.index.indexed[:size]
            means = class_means(
                self.index.embeddings[:size][kept], self.store.labels[:size][kept], self.num_classes
            )
            return ncm_scores(queries, means)
        if head == "knn":
            return knn_scores(*self.search(queries, k), self.num_classes)
        raise ConfigError(f"memory head must be ncm or knn, got {head!r}")

    def class_counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.store.labels[: self.store.size], minlength=num_classes)

    def state_dict(self) -> dict[str, Any]:
        """Items and selector state; the index is rebuilt from the items, never saved."""
        return {
            "store": self.store.state_dict(),
            "selector": self.selector.state_dict(),
            "typical": torch.from_numpy(self.typical.copy()),
            "refreshed": self.refreshed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.store.load_state_dict(state["store"])
        self.selector.load_state_dict(state["selector"])
        if "typical" in state:  # checkpoints from before dedup existed lack it
            self.typical = state["typical"].numpy().copy()
            self.refreshed = int(state["refreshed"])
        if self.index is not None and self.embed is not None:
            self.index.clear()
            size = self.store.size
            if size:
                self.index.write(np.arange(size), self.embed(self.store.features[:size]))
