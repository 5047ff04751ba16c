"""A FAISS index over fixed slots: slot `s` of a store is id `s`, so the two agree.

Embeddings are unit rows, searched by inner product (cosine similarity). `embeddings`
(host, `[capacity, dim]`) and `indexed` (which slots a search may return) are the
truth; the FAISS structure follows every write. The kind is chosen by capacity, and
what an eviction (a slot overwritten by a newcomer) costs differs:

- CPU flat, capacity <= `FLAT_LIMIT` (default): exact. An `IndexFlatIP` holding all
  `capacity` rows from the start, whose row storage *is* `embeddings` (a numpy view of
  FAISS's buffer): an eviction is a row copy, O(dim), no remove/add. Empty or
  non-finite slots are masked out of searches with an `IDSelectorBitmap` (skipped once
  every slot is indexed). A search costs O(items x dim): ~1 ms for 10 queries at 10k
  items, ~40-100 ms at 100k (benchmarks/memory.py), hence the limit.
- CPU IVF, capacity > `FLAT_LIMIT`: approximate (`NPROBE` of sqrt(capacity) lists).
  Exact search over `embeddings` until `TRAIN_PER_LIST` x lists items are indexed,
  then k-means trains the lists once and every indexed row is added. An eviction is
  `remove_ids` + `add_with_ids` of the slot (a hashtable direct map makes the removal
  O(1), the add one centroid assignment: tens of microseconds). A rewrite of most of
  the index at once (re-embedding everything at a task boundary) retrains the lists,
  since their centroids were drawn from the old embedding.
- HNSW is not offered: FAISS HNSW cannot delete, so every eviction would leave a
  tombstone to filter out of searches, and the graph would need a rebuild (O(n log n),
  seconds at 100k) every `capacity` evictions; its inserts were also ~100x slower than
  IVF's here (0.8 ms per row at dim 128, M 32).
- GPU flat (faiss with GPU support and `device="cuda"`, any capacity: a GPU scans
  100k rows in well under a millisecond): GPU indexes cannot remove or overwrite, so
  writes go to the host array and mark the index stale; the next search rebuilds it,
  one host-to-device copy of the indexed rows, O(items x dim), per search after writes.
The index itself is never saved: the owner stores the embeddings and writes them again.
"""

from __future__ import annotations

from typing import Literal

import faiss
import numpy as np

from streamcl.ingest.errors import ConfigError

FLAT_LIMIT = 20_000
"""Largest capacity searched exactly on the CPU (a flat search of 10 queries ~2 ms here)."""
TRAIN_PER_LIST = 39
"""IVF trains once this many rows per list are indexed (FAISS's k-means minimum)."""
NPROBE = 16
"""IVF lists scanned per query (of sqrt(capacity)): recall vs cost, tests/test_memory_index.py."""
EMPTY = -1
"""Slot reported for a missing neighbour (fewer items indexed than asked for)."""


def gpu_available() -> bool:
    """Whether this faiss build has GPU support and sees a GPU (faiss-cpu never does)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def set_threads(threads: int) -> None:
    """FAISS's OpenMP threads; 1 for batch-sized queries, where spinning threads cost more."""
    faiss.omp_set_num_threads(threads)


class EmbeddingIndex:
    """`capacity` slots of `[dim]` unit embeddings; `write` overwrites, `search` finds.

    A non-finite embedding is never indexed: its slot is left out of searches (and
    counted in `non_finite`) until a finite row overwrites it. kind: `auto` picks by
    capacity (module docstring); `flat` / `ivf` force one (CPU only).
    """

    def __init__(
        self,
        capacity: int,
        dim: int,
        device: str = "cpu",
        kind: Literal["auto", "flat", "ivf"] = "auto",
    ):
        if capacity < 1 or dim < 1:
            raise ConfigError(f"index needs capacity >= 1 and dim >= 1, got {capacity}, {dim}")
        if device == "cuda" and not gpu_available():
            raise ConfigError("FAISS GPU index requested but faiss has no GPU support here")
        self.device = device
        self.indexed = np.zeros(capacity, dtype=bool)
        self.non_finite = 0
        self._gpu = faiss.StandardGpuResources() if device == "cuda" else None
        self.kind = "flat" if kind == "auto" and capacity <= FLAT_LIMIT else kind
        if self.kind == "auto":
            self.kind = "ivf"
        if self._gpu is not None:
            self.kind = "flat"
        self._stale = False
        self.embeddings: np.ndarray
        self._index: faiss.Index | None
        self._ivf: faiss.IndexIVFFlat | None = None  # trained once enough rows are indexed
        if self._gpu is not None:
            self._index = faiss.GpuIndexFlatIP(self._gpu, dim)
            self.embeddings = np.zeros((capacity, dim), dtype=np.float32)
        elif self.kind == "flat":
            self._index = faiss.IndexFlatIP(dim)
            self._index.add(np.zeros((capacity, dim), dtype=np.float32))
            # FAISS's own row storage, written in place; lives as long as self._index.
            self.embeddings = faiss.rev_swig_ptr(self._index.get_xb(), capacity * dim).reshape(
                capacity, dim
            )
        else:
            self._index = None
            self.embeddings = np.zeros((capacity, dim), dtype=np.float32)
            self.lists = max(1, int(np.sqrt(capacity)))

    @property
    def backend(self) -> str:
        if self._gpu is not None:
            return "faiss-gpu-flat"
        return f"faiss-cpu-{self.kind}"

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def count(self) -> int:
        """Slots a search can return."""
        return int(self.indexed.sum())

    @property
    def nbytes(self) -> int:
        """The vectors (stored once for CPU flat; a host copy plus the FAISS copy for GPU and
        IVF, whose lists also hold an id per row and the centroids) and the mask."""
        if self._gpu is None and self.kind == "flat":
            return self.embeddings.nbytes + self.indexed.nbytes
        own = self.embeddings.nbytes + self.indexed.nbytes
        if self._gpu is not None:
            return own + self.embeddings.nbytes
        if self._ivf is None:
            return own
        rows = self._ivf.ntotal * (self.dim * 4 + 8)
        return own + rows + self.lists * self.dim * 4

    @property
    def embedding_bytes(self) -> int:
        """The host embeddings (for CPU flat, also the index's own rows)."""
        return self.embeddings.nbytes

    def stored_ids(self) -> np.ndarray:
        """Sorted ids a search can return, read from the FAISS structure where it keeps them
        (IVF lists); the mask for the flat indexes, whose rows are the slots."""
        if self._ivf is not None:
            lists = self._ivf.invlists
            assert lists is not None  # an IVF index always has its lists
            ids = [
                faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                for i in range(lists.nlist)
            ]
            return np.sort(np.concatenate(ids)).astype(np.int64)
        return np.flatnonzero(self.indexed)

    def write(self, slots: np.ndarray, embeddings: np.ndarray) -> None:
        """Overwrite distinct `slots` `[n]` with `embeddings` `[n, dim]`."""
        slots = np.asarray(slots, dtype=np.int64)
        rows = np.asarray(embeddings, dtype=np.float32)
        finite = np.asarray(np.isfinite(rows).all(axis=1))
        self.non_finite += int((~finite).sum())
        self.embeddings[slots] = np.where(finite[:, None], rows, 0.0)
        self.indexed[slots] = finite
        self._stale = self._gpu is not None
        if self._ivf is not None:
            if len(slots) * 2 >= self.count:  # most rows changed: lists trained on old ones
                self._ivf = None
                return
            self._ivf.remove_ids(faiss.IDSelectorArray(len(slots), faiss.swig_ptr(slots)))
            kept = slots[finite]
            if len(kept):
                self._ivf.add_with_ids(self.embeddings[kept], kept)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` by inner product: scores `[B, k]` float32 and slots `[B, k]` (`EMPTY` pads)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(k, 0)
        if not len(queries) or not k or not self.indexed.any():
            return np.zeros((len(queries), k), np.float32), np.full((len(queries), k), EMPTY)
        if self._gpu is not None:
            return self._search_gpu(queries, k)
        if self.kind == "ivf":
            return self._search_ivf(queries, k)
        assert self._index is not None  # flat indexes exist from the start
        if self.indexed.all():
            scores, slots = self._index.search(queries, k)
        else:
            bitmap = np.packbits(self.indexed, bitorder="little")  # bit s = slot s
            selector = faiss.IDSelectorBitmap(len(self.indexed), faiss.swig_ptr(bitmap))
            params = faiss.SearchParameters()
            params.sel = selector
            scores, slots = self._index.search(queries, k, params=params)
        return scores, slots.astype(np.int64)

    def _search_ivf(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        present = np.flatnonzero(self.indexed)
        if self._ivf is None and len(present) >= TRAIN_PER_LIST * self.lists:
            self._train(present)
        if self._ivf is None:  # too few rows to train lists: exact search over them
            flat = faiss.IndexFlatIP(self.dim)
            flat.add(self.embeddings[present])
            scores, rows = flat.search(queries, k)
            return scores, np.where(rows >= 0, present[rows.clip(0)], EMPTY).astype(np.int64)
        scores, slots = self._ivf.search(queries, k)
        return scores, slots.astype(np.int64)

    def _train(self, present: np.ndarray) -> None:
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, self.lists, faiss.METRIC_INNER_PRODUCT)
        index.train(self.embeddings[present])
        hashtable = faiss.DirectMap.Hashtable  # type: ignore[attr-defined]
        index.set_direct_map_type(hashtable)  # O(1) remove_ids
        index.add_with_ids(self.embeddings[present], present)
        index.nprobe = min(NPROBE, self.lists)
        self._quantizer = quantizer  # the IVF index does not own it
        self._ivf = index

    def _search_gpu(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        present = np.flatnonzero(self.indexed)
        assert self._index is not None
        if self._stale:
            self._index.reset()
            self._index.add(self.embeddings[present])
            self._stale = False
        scores, rows = self._index.search(queries, k)  # rows: positions among `present`
        return scores, np.where(rows >= 0, present[rows.clip(0)], EMPTY).astype(np.int64)

    def clear(self) -> None:
        self.indexed[:] = False
        self.embeddings[:] = 0.0
        self.non_finite = 0
        self._stale = self._gpu is not None
        self._ivf = None
