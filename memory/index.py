"""A FAISS index over fixed slots: slot `s` of a store is FAISS id `s`, so the two agree.

Embeddings are unit rows, searched by inner product (cosine similarity). Exact flat
search only: at the budgets this service runs (1k-100k items, batch-sized queries) a
query costs O(items x dim) and stays in milliseconds (benchmarks/memory.py), with no
training and exact answers; IVF/HNSW would add approximation and, for HNSW, no removal.

Keeping ids and slots in step:
- CPU (default): `IndexIDMap2(IndexFlatIP)`. Overwriting slots removes their old ids
  (one `remove_ids` per write: O(items), a compaction of the flat array) and adds the
  new rows with the same ids.
- GPU (faiss built with GPU support and `device="cuda"`): GPU flat indexes cannot remove,
  so writes only mark the index stale and the next search rebuilds it from the host copy
  of the embeddings (O(items x dim) host-to-device per search after a write).
The index itself is never saved: `rebuild` recreates it from the embeddings, which the
owner recomputes from its stored items on load.
"""

from __future__ import annotations

import faiss
import numpy as np

from ingest.errors import ConfigError

EMPTY = -1
"""Slot reported for a missing neighbour (fewer items stored than asked for)."""


def gpu_available() -> bool:
    """Whether this faiss build has GPU support and sees a GPU (faiss-cpu never does)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def set_threads(threads: int) -> None:
    """FAISS's OpenMP threads; 1 for batch-sized queries, where spinning threads cost more."""
    faiss.omp_set_num_threads(threads)


class EmbeddingIndex:
    """`capacity` slots of `[dim]` unit embeddings; `write` overwrites, `search` finds.

    A non-finite embedding is never indexed: its slot is left out of searches (and
    counted in `non_finite`) until a finite row overwrites it.
    """

    def __init__(self, capacity: int, dim: int, device: str = "cpu"):
        if capacity < 1 or dim < 1:
            raise ConfigError(f"index needs capacity >= 1 and dim >= 1, got {capacity}, {dim}")
        if device == "cuda" and not gpu_available():
            raise ConfigError("FAISS GPU index requested but faiss has no GPU support here")
        self.device = device
        self.embeddings = np.zeros((capacity, dim), dtype=np.float32)
        self.indexed = np.zeros(capacity, dtype=bool)
        self.non_finite = 0
        self._gpu = faiss.StandardGpuResources() if device == "cuda" else None
        self._stale = False
        self._index = self._empty()

    @property
    def backend(self) -> str:
        return "faiss-gpu-flat" if self._gpu is not None else "faiss-cpu-flat"

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def ntotal(self) -> int:
        """Rows in the FAISS index (equals the indexed slots once a search has run)."""
        return int(self._index.ntotal)

    @property
    def nbytes(self) -> int:
        """Host copy plus the index's own rows (a flat index stores every vector once)."""
        return (
            self.embeddings.nbytes
            + self.indexed.nbytes
            + int(self.indexed.sum())
            * 4
            * (
                self.dim + 2  # vector + 64-bit id
            )
        )

    def _empty(self) -> faiss.Index:
        if self._gpu is not None:
            return faiss.GpuIndexFlatIP(self._gpu, self.dim)
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def write(self, slots: np.ndarray, embeddings: np.ndarray) -> None:
        """Overwrite distinct `slots` `[n]` with `embeddings` `[n, dim]`."""
        slots = np.asarray(slots, dtype=np.int64)
        rows = np.ascontiguousarray(embeddings, dtype=np.float32)
        finite = np.asarray(np.isfinite(rows).all(axis=1))
        self.non_finite += int((~finite).sum())
        if self._gpu is None:
            old = slots[self.indexed[slots]]
            if len(old):
                self._index.remove_ids(old)
            if finite.any():
                self._index.add_with_ids(rows[finite], slots[finite])
        else:
            self._stale = True
        self.embeddings[slots] = np.where(finite[:, None], rows, 0.0)
        self.indexed[slots] = finite

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` by inner product: scores `[B, k]` float32 and slots `[B, k]` (`EMPTY` pads)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self._stale:
            self.rebuild()
        if not len(queries) or k < 1:
            return np.zeros((len(queries), max(k, 0)), np.float32), np.full(
                (len(queries), max(k, 0)), EMPTY, np.int64
            )
        scores, slots = self._index.search(queries, k)
        if self._gpu is not None:  # GPU rows are positions among the indexed slots
            order = np.flatnonzero(self.indexed)
            slots = np.where(slots >= 0, order[slots.clip(0)], EMPTY)
        return scores, slots.astype(np.int64)

    def rebuild(self) -> None:
        """Recreate the FAISS index from the host copy (after a load, or when stale)."""
        self._index = self._empty()
        present = np.flatnonzero(self.indexed)
        if len(present):
            if self._gpu is not None:
                self._index.add(self.embeddings[present])
            else:
                self._index.add_with_ids(self.embeddings[present], present.astype(np.int64))
        self._stale = False

    def clear(self) -> None:
        self.indexed[:] = False
        self.embeddings[:] = 0.0
        self.non_finite = 0
        self.rebuild()
