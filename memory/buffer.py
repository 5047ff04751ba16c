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

from streamcl.ingest.errors import ConfigError
from streamcl.memory.condensed import CondensedSet
from streamcl.memory.index import EMPTY, EmbeddingIndex
from streamcl.memory.nearest import Head, class_means, knn_scores, ncm_scores
from streamcl.memory.retrieval import RETRIEVALS, Retrieval, draw_slots
from streamcl.memory.selectors import SELECTORS, SKIP, Selector
from streamcl.memory.store import ExemplarStore

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

    policy: the selector keeping what fits (memory/selectors.py); retrieval: how `sample`
    draws (memory/retrieval.py); `neighbours` needs the index. Both are names in their
    registry or `package.module:function`.
    dedup: an arrival whose nearest same-class item is closer than `dedup` times the
    class's typical such distance refreshes (overwrites) that item instead of taking a
    slot through the selector; 0 turns it off. Needs the index.
    condensed: k-means centroids kept per class (memory/condensed.py), taken out of
    `capacity` (raw slots = capacity - num_classes x condensed) and replayed like raw
    items, in proportion to their number; they are not in the index.
    """

    def __init__(
        self,
        capacity: int,
        feature_shape: tuple[int, ...],
        dtype: str = "uint8",
        policy: str = "class-balanced",
        num_classes: int = 10,
        seed: int = 0,
        embed: Embed | None = None,
        retrieval: str = "uniform",
        dedup: float = 0.0,
        index_device: Literal["cpu", "cuda"] = "cpu",
        condensed: int = 0,
    ):
        if capacity < 1:
            raise ConfigError(f"memory capacity must be >= 1 item, got {capacity}")
        if condensed < 0 or capacity - num_classes * condensed < 1:
            raise ConfigError(
                f"memory of {capacity} items cannot hold {condensed} condensed exemplars for "
                f"each of {num_classes} classes and at least 1 raw item"
            )
        if not 0.0 <= dedup < 1.0:
            raise ConfigError(f"memory dedup must be in [0, 1), got {dedup}")
        self.retrieval: Retrieval = RETRIEVALS.create(retrieval)
        if embed is None and (self.retrieval.needs_index or dedup > 0):
            raise ConfigError(f"memory retrieval {retrieval!r} / dedup {dedup} need an embedding")
        self.policy = policy
        self.dedup = dedup
        self.num_classes = num_classes
        self.store = ExemplarStore(capacity - num_classes * condensed, feature_shape, dtype)
        self.condensed = (
            CondensedSet(num_classes, condensed, feature_shape, dtype, seed=seed)
            if condensed
            else None
        )
        self.selector: Selector = SELECTORS.create(policy, num_classes=num_classes, seed=seed)
        self.embed = embed
        self.index: EmbeddingIndex | None = None
        if embed is not None:
            dim = embed(np.zeros((1, *feature_shape), dtype=dtype)).shape[1]
            self.index = EmbeddingIndex(self.store.capacity, dim, index_device)
        self.typical = np.zeros(num_classes)  # running nearest same-class distance per class
        self.refreshed = 0  # arrivals that refreshed a near duplicate instead of a slot

    def __len__(self) -> int:
        return self.store.size + (len(self.condensed) if self.condensed is not None else 0)

    @property
    def capacity(self) -> int:
        extra = self.condensed.per_class * self.num_classes if self.condensed is not None else 0
        return self.store.capacity + extra

    @property
    def nbytes(self) -> int:
        index = self.index.nbytes if self.index is not None else 0
        condensed = self.condensed.nbytes if self.condensed is not None else 0
        return self.store.nbytes + index + condensed

    def add(self, features: np.ndarray, labels: np.ndarray, tasks: np.ndarray) -> int:
        """Offer `[B, *shape]` exemplars; returns how many were stored (refreshes included)."""
        if self.condensed is not None:
            self.condensed.observe(features, labels, tasks)
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

        near, near_labels: the incoming batch `[B, *shape]` and `[B]`, which retrieval
        policies that `needs_index` draw around; ignored by the others. Empty buffer:
        empty draw.
        """
        queries = None
        if self.retrieval.needs_index and near is not None and self.embed is not None:
            queries = self.embed(near)
        size, extra = self.store.size, len(self.condensed) if self.condensed is not None else 0
        from_condensed = 0
        if extra:  # each stored item, raw or condensed, equally likely to be drawn
            from_condensed = int(
                (torch.rand(n, generator=generator) * (size + extra) >= size).sum()
            )
        slots = draw_slots(
            self.retrieval,
            n - from_condensed,
            self.store.labels[:size],
            generator,
            self.index,
            queries,
            near_labels,
        )
        draw = self.store.read(slots)
        if not from_condensed or self.condensed is None:
            return Draw(*draw)
        picks = torch.randint(0, extra, (from_condensed,), generator=generator).numpy()
        condensed = [torch.from_numpy(a[picks]) for a in self.condensed.items()]
        return Draw(*(torch.cat([a, b]) for a, b in zip(draw, condensed, strict=True)))

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
            **({"condensed": self.condensed.state_dict()} if self.condensed is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.store.load_state_dict(state["store"])
        self.selector.load_state_dict(state["selector"])
        if "typical" in state:  # checkpoints from before dedup existed lack it
            self.typical = state["typical"].numpy().copy()
            self.refreshed = int(state["refreshed"])
        if self.condensed is not None:
            self.condensed.load_state_dict(state["condensed"])
        if self.index is not None and self.embed is not None:
            self.index.clear()
            size = self.store.size
            if size:
                self.index.write(np.arange(size), self.embed(self.store.features[:size]))
