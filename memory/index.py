"""A FAISS index over fixed slots: slot `s` of a store is row/id `s`, so the two agree.

Embeddings are unit rows, searched by inner product (cosine similarity). Exact flat
search only: at the budgets this service runs (1k-100k items, batch-sized queries) a
query costs O(items x dim) with no training and exact answers (benchmarks/
replay_memory.py has the figures); IVF would add approximation, HNSW cannot delete.

Keeping rows and slots in step:
- CPU (default): an `IndexFlatIP` holding all `capacity` rows from the start, whose row
  storage *is* `embeddings` (a numpy view of FAISS's buffer): overwriting a slot is a
  row copy, O(dim), with no remove/add and no second copy of the vectors. Slots holding
  nothing (not yet filled, or a non-finite embedding) are masked out of searches with
  an `IDSelectorBitmap`; the mask is skipped once every slot is indexed.
- GPU (faiss built with GPU support and `device="cuda"`): GPU flat indexes cannot remove
  or overwrite, so writes go to a host array and mark the index stale; the next search
  rebuilds it (O(items x dim) host-to-device per search after a write).
The index itself is never saved: the owner recomputes embeddings from its stored items
on load and writes them again.
"""

from __future__ import annotations

import faiss
import numpy as np

from streamcl.ingest.errors import ConfigError

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
    counted in `non_finite`) until a finite row overwrites it.
    """

    def __init__(self, capacity: int, dim: int, device: str = "cpu"):
        if capacity < 1 or dim < 1:
            raise ConfigError(f"index needs capacity >= 1 and dim >= 1, got {capacity}, {dim}")
        if device == "cuda" and not gpu_available():
            raise ConfigError("FAISS GPU index requested but faiss has no GPU support here")
        self.device = device
        self.indexed = np.zeros(capacity, dtype=bool)
        self.non_finite = 0
        self._gpu = faiss.StandardGpuResources() if device == "cuda" else None
        self._stale = False
        self.embeddings: np.ndarray
        self._index: faiss.Index
        if self._gpu is None:
            self._index = faiss.IndexFlatIP(dim)
            self._index.add(np.zeros((capacity, dim), dtype=np.float32))
            # FAISS's own row storage, written in place; lives as long as self._index.
            self.embeddings = faiss.rev_swig_ptr(self._index.get_xb(), capacity * dim).reshape(
                capacity, dim
            )
        else:
            self._index = faiss.GpuIndexFlatIP(self._gpu, dim)
            self.embeddings = np.zeros((capacity, dim), dtype=np.float32)

    @property
    def backend(self) -> str:
        return "faiss-gpu-flat" if self._gpu is not None else "faiss-cpu-flat"

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def count(self) -> int:
        """Slots a search can return."""
        return int(self.indexed.sum())

    @property
    def nbytes(self) -> int:
        """The vectors (stored once on CPU; host copy plus device copy on GPU) and the mask."""
        copies = 1 if self._gpu is None else 2
        return copies * self.embeddings.nbytes + self.indexed.nbytes

    def write(self, slots: np.ndarray, embeddings: np.ndarray) -> None:
        """Overwrite distinct `slots` `[n]` with `embeddings` `[n, dim]`."""
        slots = np.asarray(slots, dtype=np.int64)
        rows = np.asarray(embeddings, dtype=np.float32)
        finite = np.asarray(np.isfinite(rows).all(axis=1))
        self.non_finite += int((~finite).sum())
        self.embeddings[slots] = np.where(finite[:, None], rows, 0.0)
        self.indexed[slots] = finite
        self._stale = self._gpu is not None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` by inner product: scores `[B, k]` float32 and slots `[B, k]` (`EMPTY` pads)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(k, 0)
        if not len(queries) or not k or not self.indexed.any():
            return np.zeros((len(queries), k), np.float32), np.full((len(queries), k), EMPTY)
        if self._gpu is not None:
            return self._search_gpu(queries, k)
        if self.indexed.all():
            scores, slots = self._index.search(queries, k)
        else:
            bitmap = np.packbits(self.indexed, bitorder="little")  # bit s = slot s
            selector = faiss.IDSelectorBitmap(len(self.indexed), faiss.swig_ptr(bitmap))
            params = faiss.SearchParameters()
            params.sel = selector
            scores, slots = self._index.search(queries, k, params=params)
        return scores, slots.astype(np.int64)

    def _search_gpu(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        present = np.flatnonzero(self.indexed)
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
