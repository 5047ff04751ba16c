"""The memory's index agrees with its buffer through insert / evict / refresh / query.

The embedding moves like a model's features (a projection that drifts between
steps), so stored embeddings go stale and the buffer's refresh budget rewrites them.
Arrival ids ride in the task column: a slot whose id changed was written by that
arrival, which lets the test keep its own mirror of what every row must hold.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamcl.memory.buffer import ReplayBuffer
from streamcl.memory.index import EmbeddingIndex, set_threads

DIM = 8


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> None:
    """As the service runs FAISS: batch-sized searches on idle OpenMP threads cost ~100x."""
    set_threads(1)


class DriftingEmbed:
    """`normalize(features @ W)`; `drift` moves W as an update would move a model."""

    def __init__(self, seed: int, width: int = 6):
        self.rng = np.random.default_rng(seed)
        self.weight = self.rng.normal(size=(width, DIM)).astype(np.float32)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        rows = np.asarray(features, np.float32) @ self.weight
        with np.errstate(invalid="ignore"):
            return rows / np.linalg.norm(rows, axis=1, keepdims=True).clip(1e-12)

    def drift(self, scale: float = 0.05) -> None:
        self.weight += scale * self.rng.normal(size=self.weight.shape).astype(np.float32)


class Mirror:
    """What each slot must hold, kept from the arrivals and the refresh rule alone."""

    def __init__(self, buffer: ReplayBuffer):
        self.buffer = buffer
        capacity = buffer.store.capacity
        self.ids = np.full(capacity, -1, dtype=np.int64)  # arrival id per slot
        self.labels = np.full(capacity, -1, dtype=np.int64)
        self.embeddings = np.zeros((capacity, DIM), dtype=np.float32)
        self.evictions = 0

    def insert(self, features: np.ndarray, labels: np.ndarray, first_id: int) -> int:
        """Offer a batch; returns the operations it made (inserts, evictions, refreshes)."""
        buffer, store = self.buffer, self.buffer.store
        assert buffer.embed is not None
        cursor, before, size = buffer.cursor, store.tasks.copy(), store.size
        ids = first_id + np.arange(len(labels))
        buffer.add(features, labels, ids)
        written = np.flatnonzero(store.tasks != before)
        # Refreshed: the next `refresh` of the items stored before the batch, round-robin,
        # re-embedded along with it (an item the batch overwrote keeps its new embedding).
        due = (cursor + np.arange(min(buffer.refresh or 0, size))) % max(size, 1)
        due = due[~np.isin(due, written)]
        self.embeddings[due] = buffer.embed(store.features[due])
        self.evictions += int((self.ids[written] >= 0).sum())
        self.ids[written] = store.tasks[written]
        self.labels[written] = labels[self.ids[written] - first_id]
        self.embeddings[written] = buffer.embed(features[self.ids[written] - first_id])
        return len(labels) + len(due)

    def refresh_all(self) -> int:
        """A boundary: every item re-embedded, unless the budget says embeddings are fixed."""
        self.buffer.consolidate()
        size = self.buffer.store.size if self.buffer.refresh is not None else 0
        assert self.buffer.embed is not None
        self.embeddings[:size] = self.buffer.embed(self.buffer.store.features[:size])
        return size

    def check(self, queries: np.ndarray, k: int) -> None:
        """Ids, labels and rows agree exactly / to float rounding; search equals brute force."""
        buffer, index = self.buffer, self.buffer.index
        assert index is not None
        size = buffer.store.size
        np.testing.assert_array_equal(buffer.store.tasks[:size], self.ids[:size])
        np.testing.assert_array_equal(buffer.store.labels[:size], self.labels[:size])
        finite = np.isfinite(self.embeddings).all(axis=1) & (self.ids >= 0)
        np.testing.assert_array_equal(index.stored_ids(), np.flatnonzero(finite))
        np.testing.assert_allclose(index.embeddings[finite], self.embeddings[finite], atol=1e-5)
        slots = np.flatnonzero(finite)
        scores, found = index.search(queries, k)
        truth = queries @ self.embeddings[slots].T
        m = min(k, len(slots))
        top = np.argpartition(-truth, m - 1, axis=1)[:, :m] if m else truth[:, :0].astype(int)
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(truth, top, 1), 1), 1)
        if (found[:, :m] != slots[top]).any():  # only ties may order differently
            np.testing.assert_allclose(scores[:, :m], np.take_along_axis(truth, top, 1), atol=1e-5)
        assert (found[:, m:] == -1).all()
        _, labels = buffer.search(queries[:16], k)
        np.testing.assert_array_equal(labels[:, :m], buffer.store.labels[found[:16, :m]])


def test_a_million_operations_keep_index_and_buffer_in_agreement() -> None:
    """1,000,000+ operations in batches: arrivals (a share of them non-finite, evicting
    once the memory is full, near-duplicates refreshing items via dedup), the per-update
    refresh budget, whole-memory re-embeds after drift, and exact queries; every step
    the index is checked against the mirror and brute force."""
    rng = np.random.default_rng(0)
    embed = DriftingEmbed(1)
    buffer = ReplayBuffer(
        200, (6,), "float32", num_classes=5, embed=embed, dedup=0.3, refresh=64, seed=3
    )
    mirror = Mirror(buffer)
    prototypes = rng.normal(size=(60, 6)).astype(np.float32)
    operations, arrivals, step = 0, 1, 0  # id 0 is what empty slots hold
    while operations < 1_000_000:
        pick = rng.integers(0, 60, 400)
        features = prototypes[pick] + rng.normal(0, 0.05, size=(400, 6)).astype(np.float32)
        features[rng.random(400) < 0.01, 0] = np.nan
        operations += mirror.insert(features, pick % 5, arrivals)
        arrivals += 400
        embed.drift()
        if step % 50 == 49:
            operations += mirror.refresh_all()
        queries = embed(rng.normal(size=(256, 6)).astype(np.float32))
        mirror.check(queries, 8)
        operations += len(queries)
        step += 1
    assert mirror.evictions > 50_000 and buffer.refreshed > 50_000
    assert buffer.index is not None and buffer.index.non_finite > 500


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("insert"), st.integers(1, 12), st.integers(0, 2**16)),
            st.tuples(st.just("drift"), st.just(0), st.just(0)),
            st.tuples(st.just("refresh-all"), st.just(0), st.just(0)),
        ),
        min_size=1,
        max_size=40,
    ),
    capacity=st.integers(1, 12),
    refresh=st.one_of(st.none(), st.integers(0, 5)),
    dedup=st.sampled_from([0.0, 0.5]),
)
def test_random_operation_sequences_keep_agreement(
    ops: list[tuple[str, int, int]], capacity: int, refresh: int | None, dedup: float
) -> None:
    """Small memories under any op sequence; hypothesis shrinks a failure to a few ops."""
    embed = DriftingEmbed(0)
    buffer = ReplayBuffer(
        capacity, (6,), "float32", num_classes=3, embed=embed, dedup=dedup, refresh=refresh
    )
    mirror = Mirror(buffer)
    arrivals = 1  # id 0 is what empty slots hold
    for op, n, seed in ops:
        rng = np.random.default_rng(seed)
        if op == "insert":
            features = rng.normal(size=(n, 6)).astype(np.float32)
            features[rng.random(n) < 0.1, 1] = np.inf
            mirror.insert(features, rng.integers(0, 3, n), arrivals)
            arrivals += n
        elif op == "drift":
            embed.drift(0.5)
        else:
            mirror.refresh_all()
        mirror.check(embed(np.eye(6, dtype=np.float32)), 4)


@pytest.mark.parametrize("dim", [16])
def test_ivf_index_holds_exactly_the_indexed_slots_and_finds_most_neighbours(dim: int) -> None:
    """Past the flat limit the index is IVF: after churn (evictions, non-finite rows, a
    whole rewrite that retrains) its lists hold exactly the indexed slots, and the top-10
    overlap with brute force stays high (measured 0.97-0.99 over seeds 0-4 at nprobe 16)."""
    rng = np.random.default_rng(0)
    capacity = 25_000
    index = EmbeddingIndex(capacity, dim)
    assert index.backend == "faiss-cpu-ivf"
    truth = rng.normal(size=(capacity, dim)).astype(np.float32)
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    index.write(np.arange(capacity), truth)
    index.search(truth[:1], 1)  # trains the lists
    for round_ in range(3):
        slots = rng.choice(capacity, 2000, replace=False)
        rows = rng.normal(size=(2000, dim)).astype(np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        rows[:50, 0] = np.nan
        index.write(slots, rows)
        truth[slots] = rows
        if round_ == 1:  # a whole rewrite (task-boundary re-embed) retrains the lists
            index.write(np.arange(capacity), truth)
            index.search(truth[:1], 1)
    finite = np.flatnonzero(np.isfinite(truth).all(axis=1))
    np.testing.assert_array_equal(index.stored_ids(), finite)
    queries = truth[finite[:200]] + 0.1 * rng.normal(size=(200, dim)).astype(np.float32)
    _, found = index.search(queries, 10)
    exact = finite[np.argsort(-(queries @ truth[finite].T), axis=1)[:, :10]]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact, strict=True)])
    assert recall > 0.9
