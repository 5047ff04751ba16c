"""Replay buffer contract suite over both policies, plus policy-specific statistics."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch

from streamcl.ingest.errors import ConfigError, StreamclError
from streamcl.memory.buffer import ReplayBuffer
from streamcl.memory.selectors import SKIP
from streamcl.memory.store import ExemplarStore

POLICIES = ["reservoir", "class-balanced"]


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


def stream(n: int, num_classes: int = 4, seed: int = 0, p: list[float] | None = None) -> Arrays:
    """Items whose task id is their index in the stream, so every row is traceable."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(num_classes, size=n, p=p).astype(np.int64)
    ids = np.arange(n, dtype=np.int64)
    features = np.stack([ids % 256, labels], axis=1).astype(np.uint8)  # [n, 2]
    return features, labels, ids


def feed(
    buffer: ReplayBuffer, features: np.ndarray, labels: np.ndarray, ids: np.ndarray, batch: int
) -> None:
    for start in range(0, len(labels), batch):
        end = start + batch
        buffer.add(features[start:end], labels[start:end], ids[start:end])


def contents(buffer: ReplayBuffer) -> Arrays:
    n = len(buffer)
    return (
        buffer.store.features[:n].copy(),
        buffer.store.labels[:n].copy(),
        buffer.store.tasks[:n].copy(),
    )


def assert_same_contents(a: ReplayBuffer, b: ReplayBuffer) -> None:
    for x, y in zip(contents(a), contents(b), strict=True):
        np.testing.assert_array_equal(x, y)


def make(policy: str, capacity: int = 20, seed: int = 0, num_classes: int = 4) -> ReplayBuffer:
    return ReplayBuffer(capacity, (2,), "uint8", policy=policy, num_classes=num_classes, seed=seed)


# --- construction -----------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -5])
def test_bad_capacity(capacity: int) -> None:
    with pytest.raises(ConfigError, match=f"memory capacity must be >= 1 item, got {capacity}"):
        ReplayBuffer(capacity, (2,))


def test_bad_policy() -> None:
    with pytest.raises(
        ConfigError, match=r"memory selector must be reservoir, class-balanced or .package"
    ):
        ReplayBuffer(10, (2,), policy="fifo")


def test_nbytes_is_the_preallocated_store() -> None:
    # 10 rows x (2 uint8 features + int64 label + int64 task) = 10 x 18 bytes.
    assert make("reservoir", capacity=10).nbytes == 180
    assert ReplayBuffer(3, (2, 2), "float32").nbytes == 3 * (16 + 16)


# --- contract: every policy -------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("batch", [1, 7, 50])
def test_capacity_is_never_exceeded(policy: str, batch: int) -> None:
    buffer = make(policy, capacity=20)
    features, labels, ids = stream(300)
    seen = 0
    for start in range(0, 300, batch):
        end = min(start + batch, 300)
        stored = buffer.add(features[start:end], labels[start:end], ids[start:end])
        seen += end - start
        assert 0 <= stored <= end - start
        assert len(buffer) == min(seen, 20)
        assert buffer.capacity == 20
    assert len(set(contents(buffer)[2].tolist())) == 20  # 20 distinct stream items


@pytest.mark.parametrize("policy", POLICIES)
def test_filling_stores_everything_in_arrival_order(policy: str) -> None:
    buffer = make(policy, capacity=20)
    features, labels, ids = stream(12)
    assert buffer.add(features, labels, ids) == 12
    stored_features, stored_labels, stored_ids = contents(buffer)
    np.testing.assert_array_equal(stored_ids, ids)
    np.testing.assert_array_equal(stored_labels, labels)
    np.testing.assert_array_equal(stored_features, features)


@pytest.mark.parametrize("policy", POLICIES)
def test_rows_stay_consistent(policy: str) -> None:
    # A row's features, label and task always come from the same stream item.
    buffer = make(policy)
    features, labels, ids = stream(500)
    feed(buffer, features, labels, ids, batch=13)
    stored_features, stored_labels, stored_ids = contents(buffer)
    np.testing.assert_array_equal(stored_features, features[stored_ids])
    np.testing.assert_array_equal(stored_labels, labels[stored_ids])


@pytest.mark.parametrize("policy", POLICIES)
def test_sample_draws_rows_that_exist_in_the_store(policy: str) -> None:
    buffer = make(policy)
    features, labels, ids = stream(200)
    feed(buffer, features, labels, ids, batch=16)
    draw = buffer.sample(64, torch.Generator().manual_seed(0))
    assert draw.features.shape == (64, 2)
    assert draw.features.dtype == torch.uint8
    assert draw.labels.shape == draw.tasks.shape == (64,)
    assert draw.labels.dtype == draw.tasks.dtype == torch.int64
    stored = {
        (tuple(f.tolist()), int(y), int(t)) for f, y, t in zip(*contents(buffer), strict=True)
    }
    for f, y, t in zip(draw.features, draw.labels, draw.tasks, strict=True):
        assert (tuple(f.tolist()), int(y), int(t)) in stored


@pytest.mark.parametrize("policy", POLICIES)
def test_sample_only_draws_filled_rows(policy: str) -> None:
    buffer = make(policy, capacity=50)
    features, labels, ids = stream(3)
    buffer.add(features, labels, ids)
    draw = buffer.sample(200, torch.Generator().manual_seed(1))
    assert set(draw.tasks.tolist()) == {0, 1, 2}  # all three drawn, never an empty slot


@pytest.mark.parametrize("policy", POLICIES)
def test_sample_is_reproducible_with_equal_generators(policy: str) -> None:
    buffer = make(policy)
    feed(buffer, *stream(100), batch=10)
    a = buffer.sample(32, torch.Generator().manual_seed(5))
    b = buffer.sample(32, torch.Generator().manual_seed(5))
    c = buffer.sample(32, torch.Generator().manual_seed(6))
    assert torch.equal(a.tasks, b.tasks)
    assert torch.equal(a.features, b.features)
    assert not torch.equal(a.tasks, c.tasks)


@pytest.mark.parametrize("policy", POLICIES)
def test_sample_from_an_empty_buffer_is_empty(policy: str) -> None:
    draw = make(policy).sample(8, torch.Generator().manual_seed(0))
    assert draw.features.shape == (0, 2)
    assert draw.labels.shape == (0,)
    assert draw.tasks.shape == (0,)


def test_sample_keeps_the_stream_dtype_and_shape() -> None:
    buffer = ReplayBuffer(4, (2, 3), "float32", policy="reservoir")
    features = np.arange(12, dtype=np.float32).reshape(2, 2, 3) / 7
    buffer.add(features, np.array([0, 1]), np.array([5, 6]))
    draw = buffer.sample(10, torch.Generator().manual_seed(0))
    assert draw.features.shape == (10, 2, 3)
    assert draw.features.dtype == torch.float32
    for f, t in zip(draw.features, draw.tasks, strict=True):
        np.testing.assert_array_equal(f.numpy(), features[int(t) - 5])


@pytest.mark.parametrize("policy", POLICIES)
def test_same_seed_same_contents(policy: str) -> None:
    a, b = make(policy, seed=11), make(policy, seed=11)
    data = stream(400, seed=4)
    feed(a, *data, batch=9)
    feed(b, *data, batch=9)
    assert_same_contents(a, b)
    c = make(policy, seed=12)
    feed(c, *data, batch=9)
    assert not np.array_equal(contents(a)[2], contents(c)[2])


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("batch", [1, 8])
def test_state_dict_round_trip_resumes_exactly(policy: str, batch: int) -> None:
    features, labels, ids = stream(400, seed=2, p=[0.55, 0.25, 0.15, 0.05])
    half = 200
    a = make(policy, seed=3)
    feed(a, features[:half], labels[:half], ids[:half], batch)
    # Through torch.save / torch.load, as a checkpoint would travel.
    saved = io.BytesIO()
    torch.save(a.state_dict(), saved)
    saved.seek(0)
    state: dict[str, Any] = torch.load(saved, weights_only=True)
    b = make(policy, seed=99)  # a different seed: everything must come from the state
    b.load_state_dict(state)
    assert_same_contents(a, b)
    feed(a, features[half:], labels[half:], ids[half:], batch)
    feed(b, features[half:], labels[half:], ids[half:], batch)
    assert_same_contents(a, b)
    np.testing.assert_array_equal(a.class_counts(4), b.class_counts(4))
    da = a.sample(50, torch.Generator().manual_seed(8))
    db = b.sample(50, torch.Generator().manual_seed(8))
    assert torch.equal(da.features, db.features)
    assert torch.equal(da.labels, db.labels)
    assert torch.equal(da.tasks, db.tasks)


@pytest.mark.parametrize("policy", POLICIES)
def test_state_dict_is_a_snapshot(policy: str) -> None:
    buffer = make(policy)
    feed(buffer, *stream(100), batch=10)
    state = buffer.state_dict()
    before = [t.clone() for t in (state["store"]["features"], state["store"]["tasks"])]
    feed(buffer, *stream(100, seed=9), batch=10)
    assert torch.equal(state["store"]["features"], before[0])
    assert torch.equal(state["store"]["tasks"], before[1])


def test_loading_more_rows_than_capacity_is_refused() -> None:
    big = make("reservoir", capacity=20)
    feed(big, *stream(50), batch=10)
    small = make("reservoir", capacity=5)
    with pytest.raises((ValueError, StreamclError), match="20 exemplars exceed capacity 5"):
        small.load_state_dict(big.state_dict())


def test_a_slot_chosen_twice_in_one_batch_keeps_the_later_arrival() -> None:
    class Scripted:
        """A selector that answers from a script: the buffer must apply it in order."""

        def slots(self, store: ExemplarStore, labels: np.ndarray) -> list[int]:
            return [0, SKIP, 0, 1][: len(labels)]

        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            pass

    buffer = make("reservoir", capacity=4)
    buffer.selector = Scripted()
    features = np.array([[10, 0], [11, 1], [12, 2], [13, 3]], np.uint8)
    assert buffer.add(features, np.array([0, 1, 2, 3]), np.array([100, 101, 102, 103])) == 2
    stored_features, stored_labels, stored_ids = contents(buffer)
    np.testing.assert_array_equal(stored_ids, [102, 103])
    np.testing.assert_array_equal(stored_labels, [2, 3])
    np.testing.assert_array_equal(stored_features, [[12, 2], [13, 3]])


# --- reservoir --------------------------------------------------------------------------------


def test_reservoir_keeps_every_item_with_probability_capacity_over_seen() -> None:
    # 1,000 seeded runs of a 100-item stream into 10 slots. Inclusion frequency of each
    # item after 50 items should be 10/50 = 0.2 and after 100 items 10/100 = 0.1
    # (binomial sd 0.013 and 0.0095: a 0.05 band is > 3.8 sd wide).
    runs, n, capacity = 1000, 100, 10
    kept_at_50 = np.zeros(50)
    kept_at_100 = np.zeros(n)
    features, labels, ids = stream(n, num_classes=2)
    for seed in range(runs):
        buffer = ReplayBuffer(capacity, (2,), policy="reservoir", seed=seed)
        feed(buffer, features[:50], labels[:50], ids[:50], batch=25)
        kept_at_50[contents(buffer)[2]] += 1
        feed(buffer, features[50:], labels[50:], ids[50:], batch=10)
        stored = contents(buffer)[2]
        assert len(set(stored.tolist())) == capacity
        kept_at_100[stored] += 1
    np.testing.assert_allclose(kept_at_50 / runs, 0.2, atol=0.05)
    np.testing.assert_allclose(kept_at_100 / runs, 0.1, atol=0.05)
    # Early and late items are equally likely to survive (no recency bias).
    assert abs(kept_at_100[:50].mean() - kept_at_100[50:].mean()) / runs < 0.01


def test_reservoir_counts_items_seen() -> None:
    buffer = make("reservoir", capacity=5)
    feed(buffer, *stream(37), batch=4)
    assert buffer.state_dict()["selector"]["seen"] == 37


# --- class-balanced ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("batch", [1, 16])
def test_class_balanced_evens_out_a_dominated_stream(seed: int, batch: int) -> None:
    buffer = make("class-balanced", capacity=20, seed=seed)
    feed(buffer, *stream(2000, seed=seed, p=[0.7, 0.1, 0.1, 0.1]), batch=batch)
    # 20 slots, 4 classes that all arrive often: exactly 5 each.
    np.testing.assert_array_equal(buffer.class_counts(4), [5, 5, 5, 5])


def test_class_balanced_counts_differ_by_at_most_one() -> None:
    buffer = make("class-balanced", capacity=22, seed=1, num_classes=3)
    feed(buffer, *stream(1500, num_classes=3, seed=5, p=[0.85, 0.1, 0.05]), batch=8)
    counts = buffer.class_counts(3)
    assert counts.sum() == 22
    assert counts.max() - counts.min() <= 1
    assert sorted(counts.tolist()) == [7, 7, 8]


def test_class_balanced_keeps_every_sample_of_a_rare_class() -> None:
    buffer = make("class-balanced", capacity=12, seed=0, num_classes=3)
    features, labels, ids = stream(600, num_classes=2, seed=1, p=[0.8, 0.2])
    labels[[50, 400]] = 2  # class 2 appears exactly twice
    features[:, 1] = labels
    feed(buffer, features, labels, ids, batch=5)
    np.testing.assert_array_equal(buffer.class_counts(3), [5, 5, 2])
    stored_ids = set(contents(buffer)[2].tolist())
    assert {50, 400} <= stored_ids


def test_newcomer_of_an_unseen_class_evicts_from_the_largest_class() -> None:
    buffer = make("class-balanced", capacity=4, seed=0, num_classes=4)
    features = np.zeros((4, 2), np.uint8)
    buffer.add(features, np.array([0, 0, 0, 1]), np.array([0, 1, 2, 3]))
    np.testing.assert_array_equal(buffer.class_counts(4), [3, 1, 0, 0])
    buffer.add(features[:1], np.array([2]), np.array([4]))
    np.testing.assert_array_equal(buffer.class_counts(4), [2, 1, 1, 0])
    assert {3, 4} <= set(contents(buffer)[2].tolist())  # class 1's only row survived
    buffer.add(features[:1], np.array([3]), np.array([5]))
    np.testing.assert_array_equal(buffer.class_counts(4), [1, 1, 1, 1])
    assert sorted(contents(buffer)[1].tolist()) == [0, 1, 2, 3]
    # A newcomer of a largest class replaces its own class or is skipped: counts hold.
    for i in range(6, 30):
        buffer.add(features[:1], np.array([i % 4]), np.array([i]))
        np.testing.assert_array_equal(buffer.class_counts(4), [1, 1, 1, 1])


def test_class_balanced_newcomer_evicts_only_from_the_largest_classes() -> None:
    buffer = make("class-balanced", capacity=6, seed=2, num_classes=3)
    features = np.zeros((6, 2), np.uint8)
    buffer.add(features, np.array([0, 0, 0, 1, 1, 2]), np.arange(6))
    np.testing.assert_array_equal(buffer.class_counts(3), [3, 2, 1])
    buffer.add(features[:1], np.array([2]), np.array([6]))
    np.testing.assert_array_equal(buffer.class_counts(3), [2, 2, 2])
    np.testing.assert_array_equal(np.sort(contents(buffer)[2][contents(buffer)[1] == 1]), [3, 4])
