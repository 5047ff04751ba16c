"""The replay buffer: an `ExemplarStore` composed with a `Selector`, optionally indexed.

With an `embed` callable (handed over by the learner; memory imports nothing of it)
every stored item also has a unit embedding in a FAISS `EmbeddingIndex` whose ids are
the store's slots. The index serves neighbour queries (the kNN noise filter),
near-duplicate-aware insertion, neighbour-informed replay draws and nearest-neighbour
prediction.

Embeddings of the model's features go stale as the model learns. The refresh budget,
`refresh` items re-embedded per `add` plus every item at `consolidate` (a task
boundary, detected shift or periodic consolidation), round-robin over the slots: no
stored embedding is older than `capacity / refresh` updates or than the last boundary,
at `refresh` embedding rows per update, embedded in the same pass as the arrivals
written to the memory (0: boundaries only).
`refresh = None` means the embeddings are a function of the features alone (pooled
inputs) and are never recomputed.
A checkpoint holds the embeddings too (restored draws are identical); embeddings that
disagree with the stored items are recomputed on load, with a log line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from streamcl.ingest.errors import ConfigError
from streamcl.memory.condensed import CondensedSet
from streamcl.memory.index import EMPTY, EmbeddingIndex
from streamcl.memory.nearest import Head, class_means, knn_scores, ncm_scores
from streamcl.memory.retrieval import (
    RETRIEVALS,
    Interfered,
    Interference,
    Retrieval,
    draw_slots,
    interfered_slots,
)
from streamcl.memory.selectors import SELECTORS, SKIP, Selector
from streamcl.memory.store import ExemplarStore

Embed = Callable[[np.ndarray], np.ndarray]
"""`[n, *shape]` features in the stream dtype -> `[n, D]` float32 unit rows."""

log = logging.getLogger(__name__)

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


MEMORY_PARTS = ("features", "embeddings", "index", "condensed")
"""The parts `ReplayBuffer.usage()` reports bytes for."""
_NONE = np.zeros(0, dtype=np.int64)
_NONE.flags.writeable = False  # shared: no slots, no rows

NO_MEMORY_USAGE: dict[str, Any] = {
    "backend": "none",
    "items": 0,
    "indexed_items": 0,
    "non_finite_embeddings": 0,
    "bytes": dict.fromkeys(MEMORY_PARTS, 0),
}
"""`usage()` of a learner without a replay memory."""


class ReplayBuffer:
    """Fixed item budget; `add` offers exemplars to the selector, `sample` draws.

    policy: the selector keeping what fits (memory/selectors.py); retrieval: how `sample`
    draws (memory/retrieval.py); `neighbours` needs the index. Both are names in their
    registry or `package.module:function`.
    dedup: an arrival whose nearest same-class item is closer than `dedup` times the
    class's typical such distance refreshes (overwrites) that item instead of taking a
    slot through the selector; 0 turns it off. Needs the index.
    condensed: synthetic exemplars kept per class (memory/condensed.py), taken out of
    `capacity` (raw slots = capacity - num_classes x condensed) and replayed like raw
    items, in proportion to their number; they are not in the index. condensed_steps:
    distribution-matching steps per update of a class after k-means (0: k-means only);
    condensed_every: arrivals of a class between updates (None: its window).
    refresh: items re-embedded per `add` (and all at `consolidate`), for an `embed`
    that follows the model; None for one that does not (module docstring).
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
        refresh: int | None = None,
        condensed_steps: int = 0,
        condensed_every: int | None = None,
    ):
        if capacity < 1:
            raise ConfigError(f"memory capacity must be >= 1 item, got {capacity}")
        if condensed < 0 or capacity - num_classes * condensed < 1:
            raise ConfigError(
                f"memory of {capacity} items cannot hold {condensed} condensed exemplars for "
                f"each of {num_classes} classes and at least 1 raw item"
            )
        if refresh is not None and refresh < 0:
            raise ConfigError(f"memory refresh must be >= 0 items per update, got {refresh}")
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
            CondensedSet(
                num_classes,
                condensed,
                feature_shape,
                dtype,
                every=condensed_every,
                steps=condensed_steps,
                seed=seed,
            )
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
        self.refresh = refresh
        self.cursor = 0  # next slot the per-update refresh re-embeds

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

    def usage(self) -> dict[str, Any]:
        """What the memory holds, for metrics and reports: index backend, items, and bytes
        by part (`embeddings` are the stored vectors, `index` what FAISS adds beyond them)."""
        index = self.index
        embeddings = index.embedding_bytes if index is not None else 0
        return {
            "backend": index.backend if index is not None else "none",
            "items": len(self),
            "indexed_items": index.count if index is not None else 0,
            "non_finite_embeddings": index.non_finite if index is not None else 0,
            "bytes": {
                "features": self.store.nbytes,
                "embeddings": embeddings,
                "index": index.nbytes - embeddings if index is not None else 0,
                "condensed": self.condensed.nbytes if self.condensed is not None else 0,
            },
        }

    def add(self, features: np.ndarray, labels: np.ndarray, tasks: np.ndarray) -> int:
        """Offer `[B, *shape]` exemplars; returns how many were stored (refreshes included).

        Without dedup only the rows written are embedded (with the items due for refresh,
        in one pass of the model): once the memory is full most arrivals are not kept.
        """
        if self.condensed is not None:
            self.condensed.observe(features, labels, tasks)
        stale = self._due_for_refresh()
        # Read before this batch overwrites any of them.
        due = self.store.features[stale] if len(stale) else features[:0]
        embeddings = renewed = None
        refresh = None
        if self.embed is not None and self.dedup > 0:  # dedup judges every arrival
            both = self.embed(np.concatenate([features, due]))
            embeddings, renewed = both[: len(features)], both[len(features) :]
            refresh = self._near_duplicates(embeddings, labels)
        slots, rows = self._choose(labels, refresh)
        if len(slots):
            self.store.write(slots, features[rows], labels[rows], tasks[rows])
        if self.index is None or self.embed is None or not len(slots) + len(stale):
            return len(slots)
        if embeddings is None:
            both = self.embed(np.concatenate([features[rows], due]))
            written, renewed = both[: len(rows)], both[len(rows) :]
        else:
            written = embeddings[rows]
        if len(slots):
            self.index.write(slots, written)
        if len(stale):
            assert renewed is not None  # embedded with the arrivals above
            kept = ~np.isin(stale, slots)  # an item overwritten just now has its embedding
            self.index.write(stale[kept], renewed[kept])
        return len(slots)

    def _choose(
        self, labels: np.ndarray, refresh: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Slots to write `[m]` and the arriving row for each `[m]`.

        Refreshes (`[B]` slot or `SKIP` per row) first, then the selector's choices in
        arrival order: a slot chosen twice keeps the later choice (as if sequential), and
        a selector's choice always beats a refresh, so the selector's bookkeeping of what
        each slot holds stays true.
        """
        if refresh is None or (refresh == SKIP).all():
            choices = self.selector.slots(self.store, labels)
            if isinstance(choices, list) and choices.count(SKIP) == len(choices):
                # Nothing kept: the common case once the memory is full.
                return _NONE, _NONE
            chosen = np.asarray(choices, dtype=np.int64)
            rows = np.flatnonzero(chosen != SKIP)
            slots = chosen[rows]
            if len(set(slots.tolist())) == len(slots):
                return slots, rows
            latest: dict[int, int] = {}
        else:
            latest = {int(refresh[i]): int(i) for i in np.flatnonzero(refresh != SKIP)}
            fresh = np.flatnonzero(refresh == SKIP)
            chosen = np.full(len(labels), SKIP, dtype=np.int64)
            chosen[fresh] = self.selector.slots(self.store, labels[fresh])
        for i, slot in enumerate(chosen.tolist()):
            if slot != SKIP:
                latest[slot] = i
        return (
            np.fromiter(latest.keys(), np.int64, len(latest)),
            np.fromiter(latest.values(), np.int64, len(latest)),
        )

    def _due_for_refresh(self) -> np.ndarray:
        """The next `refresh` stored slots, round-robin (the per-update budget)."""
        size = self.store.size
        if not self.refresh or not size or self.index is None:
            return _NONE
        slots = (self.cursor + np.arange(min(self.refresh, size))) % size
        self.cursor = int((slots[-1] + 1) % size)
        return slots

    def reembed(self, slots: np.ndarray) -> None:
        """Recompute the embeddings of stored `slots` with the current `embed`."""
        if self.index is not None and self.embed is not None and len(slots):
            self.index.write(slots, self.embed(self.store.features[slots]))

    def consolidate(self) -> None:
        """At a boundary the model has moved most: re-embed every item (unless refresh is None)."""
        if self.refresh is not None:
            self.reembed(np.arange(self.store.size))

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
        same = stored == labels[:, None]
        nearest = same.argmax(axis=1)  # the nearest same-class neighbour, where one exists
        rows = np.flatnonzero(same.any(axis=1) & np.isfinite(embeddings).all(axis=1))
        picked = (rows, nearest[rows])
        distances = np.maximum(0.0, 1.0 - scores[picked].astype(np.float64))
        # In arrival order: each row is judged against the running typical distance of
        # its class so far (a NaN distance, from a non-finite row, would pass any threshold).
        typical = self.typical.tolist()
        for i, label, slot, distance in zip(
            rows.tolist(),
            labels[rows].tolist(),
            slots[picked].tolist(),
            distances.tolist(),
            strict=True,
        ):
            before = typical[label]
            if before > 0 and distance < self.dedup * before:
                out[i] = slot
            typical[label] = (
                distance
                if before == 0
                else DEDUP_MOMENTUM * before + (1 - DEDUP_MOMENTUM) * distance
            )
        self.typical = np.array(typical)
        self.refreshed += int((out != SKIP).sum())
        return out

    def sample(
        self,
        n: int,
        generator: torch.Generator,
        near: np.ndarray | None = None,
        near_labels: np.ndarray | None = None,
        interference: Interference | None = None,
    ) -> Draw:
        """Draw `n` exemplars with replacement by the buffer's retrieval policy.

        near, near_labels: the incoming batch `[B, *shape]` and `[B]`, which retrieval
        policies that `needs_index` draw around; ignored by the others.
        interference: scores candidates for `interfered` (uniform draws without it).
        Empty buffer: empty draw.
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
        interfered = isinstance(self.retrieval, Interfered) and interference is not None
        if interfered and interference is not None and queries is not None:
            # queries exist only with an embed (so an index) and the batch given
            assert self.index is not None and near is not None and near_labels is not None
            score = interference(near, near_labels)
            store = self.store
            slots = interfered_slots(
                n - from_condensed,
                self.index,
                size,
                queries,
                lambda s: score(store.features[s], store.labels[s]),
                generator,
            )
        else:
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
        """Items, selector state and the stored embeddings (NaN rows: not indexed)."""
        state = {
            "store": self.store.state_dict(),
            "selector": self.selector.state_dict(),
            "typical": torch.from_numpy(self.typical.copy()),
            "refreshed": self.refreshed,
            "cursor": self.cursor,
            **({"condensed": self.condensed.state_dict()} if self.condensed is not None else {}),
        }
        if self.index is not None:
            size = self.store.size
            rows = np.where(self.index.indexed[:size, None], self.index.embeddings[:size], np.nan)
            state["embeddings"] = torch.from_numpy(rows.astype(np.float32))
            state["non_finite"] = self.index.non_finite
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.store.load_state_dict(state["store"])
        self.selector.load_state_dict(state["selector"])
        if "typical" in state:  # checkpoints from before dedup existed lack it
            self.typical = state["typical"].numpy().copy()
            self.refreshed = int(state["refreshed"])
        self.cursor = int(state.get("cursor", 0))
        if self.condensed is not None:
            self.condensed.load_state_dict(state["condensed"])
        if self.index is not None and self.embed is not None:
            self.index.clear()
            size = self.store.size
            saved = state.get("embeddings")
            if saved is not None and tuple(saved.shape) == (size, self.index.dim):
                self.index.write(np.arange(size), saved.numpy())
                self.index.non_finite = int(state["non_finite"])
            elif size:
                log.warning(
                    "memory checkpoint: stored embeddings %s disagree with %d items of dim %d; "
                    "re-embedding the items",
                    None if saved is None else tuple(saved.shape),
                    size,
                    self.index.dim,
                )
                self.index.write(np.arange(size), self.embed(self.store.features[:size]))
