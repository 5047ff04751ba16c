"""The FAISS-indexed memory: index and store agree, exact search, round trips, policies."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from streamcl.deploy.runtime.config import LearnerConfig, ReplayConfig
from streamcl.deploy.runtime.replay import run_replay
from streamcl.deploy.runtime.wiring import build_learner
from streamcl.ingest.datasets import load_digits
from streamcl.ingest.errors import ConfigError
from streamcl.ingest.schema import Batch, StreamSpec
from streamcl.learner.features import penultimate_embedding
from streamcl.learner.filters import input_embedding
from streamcl.learner.interference import virtual_update
from streamcl.learner.loop import OnlineLearner
from streamcl.memory.buffer import ReplayBuffer
from streamcl.memory.index import EmbeddingIndex, gpu_available
from streamcl.memory.retrieval import ClassBalanced, Uniform, draw_slots


def indexed(capacity: int = 50, dim: int = 6, **kwargs: object) -> ReplayBuffer:
    return ReplayBuffer(
        capacity, (dim,), "float32", num_classes=4, embed=input_embedding("float32"), **kwargs
    )  # type: ignore[arg-type]


def rows(n: int, dim: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def brute_force(keys: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ keys.T), axis=1, kind="stable")[:, :k]


@settings(max_examples=30, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.integers(0, 19), st.integers(1, 5), st.booleans()), min_size=1, max_size=60
    ),
    seed=st.integers(0, 2**16),
)
def test_index_follows_every_write_and_searches_exactly(
    ops: list[tuple[int, int, bool]], seed: int
) -> None:
    """Random overwrites (with non-finite rows now and then): the FAISS ids are exactly the
    finite slots, and search equals brute force over them."""
    rng = np.random.default_rng(seed)
    index = EmbeddingIndex(20, 4)
    reference = np.full((20, 4), np.nan, dtype=np.float32)
    for start, n, poison in ops:
        slots = (start + np.arange(n)) % 20
        values = rng.normal(size=(n, 4)).astype(np.float32)
        if poison:
            values[0, 1] = np.inf
        index.write(slots, values)
        reference[slots] = values
    finite = np.flatnonzero(np.isfinite(reference).all(axis=1))
    assert index.count == len(finite)
    np.testing.assert_array_equal(np.flatnonzero(index.indexed), finite)
    queries = rng.normal(size=(3, 4)).astype(np.float32)
    _, found = index.search(queries, 5)
    expected = finite[brute_force(reference[finite], queries, 5)]
    k = min(5, len(finite))
    np.testing.assert_array_equal(found[:, :k], expected)
    assert (found[:, k:] == -1).all()


def test_non_finite_embedding_is_stored_but_not_indexed_and_counted() -> None:
    buffer = indexed(10)
    features = rows(3)
    features[1, 2] = np.nan
    buffer.add(features, np.array([0, 1, 2]), np.zeros(3, np.int64))
    assert len(buffer) == 3 and buffer.index is not None
    assert buffer.index.non_finite == 1 and buffer.index.count == 2
    _, labels = buffer.search(input_embedding("float32")(rows(4, seed=9)), 3)
    assert set(labels[:, :2].flatten().tolist()) <= {0, 2} and (labels[:, 2] == -1).all()


@pytest.mark.parametrize("policy", ["reservoir", "class-balanced"])
def test_buffer_labels_and_index_agree_after_a_stream(policy: str) -> None:
    buffer = indexed(30, policy=policy)
    for step in range(40):
        buffer.add(rows(7, seed=step), np.arange(7) % 4, np.full(7, step))
    assert buffer.index is not None
    embed = input_embedding("float32")
    np.testing.assert_allclose(buffer.index.embeddings, embed(buffer.store.features), atol=1e-6)
    queries = embed(rows(5, seed=99))
    scores, labels = buffer.search(queries, 4)
    order = brute_force(embed(buffer.store.features), queries, 4)
    np.testing.assert_array_equal(labels, buffer.store.labels[order])
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_state_round_trip_rebuilds_the_index_and_draws_the_same() -> None:
    a = indexed(30, retrieval="neighbours", dedup=0.5)
    for step in range(20):
        a.add(rows(7, seed=step), np.arange(7) % 4, np.full(7, step))
    saved = io.BytesIO()
    torch.save(a.state_dict(), saved)
    saved.seek(0)
    b = indexed(30, retrieval="neighbours", dedup=0.5)
    b.load_state_dict(torch.load(saved, weights_only=True))
    near, near_labels = rows(10, seed=77), np.arange(10) % 4
    for buffer in (a, b):  # both continue the stream identically
        buffer.add(rows(7, seed=50), np.arange(7) % 4, np.full(7, 50))
    draws = [
        x.sample(16, torch.Generator().manual_seed(3), near=near, near_labels=near_labels)
        for x in (a, b)
    ]
    assert torch.equal(draws[0].tasks, draws[1].tasks)
    np.testing.assert_array_equal(a.store.tasks[: len(a)], b.store.tasks[: len(b)])
    assert a.index is not None and b.index is not None and b.index.count == len(b)
    np.testing.assert_array_equal(a.typical, b.typical)


def test_dedup_refreshes_near_duplicates_instead_of_filling_the_memory() -> None:
    """One class's arrivals are tiny jitters of 3 prototypes, another's are spread out:
    with dedup the jittered class stops taking slots; without it, it fills its share."""
    rng = np.random.default_rng(0)
    prototypes = rng.normal(size=(3, 6)).astype(np.float32)

    def feed(buffer: ReplayBuffer) -> None:
        for step in range(60):
            twins = prototypes[step % 3] + rng.normal(0, 1e-3, size=(5, 6)).astype(np.float32)
            spread = rng.normal(size=(5, 6)).astype(np.float32)
            labels = np.array([0] * 5 + [1] * 5)
            buffer.add(np.concatenate([twins, spread]), labels, np.full(10, step))

    plain, dedup = indexed(100), indexed(100, dedup=0.3)
    feed(plain)
    feed(dedup)
    assert plain.class_counts(4)[0] == 50
    # The first batch of each prototype is stored (twins within one batch are not caught),
    # every later one refreshes: 3 x 5 items, while the spread class takes the rest.
    assert dedup.class_counts(4)[0] == 15
    assert dedup.class_counts(4)[1] == 85
    assert dedup.refreshed > 200


def test_class_balanced_retrieval_evens_out_an_imbalanced_memory() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    slots = draw_slots(ClassBalanced(), 2000, labels, torch.Generator().manual_seed(0))
    share = (labels[slots.numpy()] == 1).mean()
    assert 0.45 < share < 0.55  # binomial sd at n=2000 is 0.011
    uniform = draw_slots(Uniform(), 2000, labels, torch.Generator().manual_seed(0))
    assert (labels[uniform.numpy()] == 1).mean() < 0.15


def test_neighbour_retrieval_draws_other_class_items_near_the_batch() -> None:
    buffer = indexed(40, retrieval="neighbours")
    rng = np.random.default_rng(1)
    centres = np.eye(6, dtype=np.float32)[:4] * 5
    labels = np.arange(40) % 4
    buffer.add(
        centres[labels] + rng.normal(0, 0.3, size=(40, 6)).astype(np.float32), labels, labels
    )
    # A batch of class 0 arriving next to class 2's items: half the draws come from class 2.
    near = centres[[2] * 10] + rng.normal(0, 0.3, size=(10, 6)).astype(np.float32)
    draw = buffer.sample(20, torch.Generator().manual_seed(0), near=near, near_labels=np.zeros(10))
    assert (draw.labels[:10] == 2).all()
    assert set(draw.labels[10:].tolist()) != {2}  # the uniform half


def test_indexed_options_need_an_embedding_and_sane_values() -> None:
    with pytest.raises(ConfigError, match="need an embedding"):
        ReplayBuffer(10, (2,), retrieval="neighbours")
    with pytest.raises(ConfigError, match=r"dedup must be in \[0, 1\)"):
        indexed(10, dedup=1.5)
    with pytest.raises(ConfigError, match="retrieval must be uniform"):
        indexed(10, retrieval="mir")
    with pytest.raises(ConfigError, match="need an embedding"):
        ReplayBuffer(10, (2,), retrieval="interfered")
    with pytest.raises(ConfigError, match="no embedding index"):
        ReplayBuffer(10, (2,)).search(np.zeros((1, 2), np.float32), 1)


def test_memory_heads_predict_from_the_stored_exemplars() -> None:
    """Two clusters per class in 6-D; queries near a cluster get its class from both heads,
    and the class scores are probabilities."""
    rng = np.random.default_rng(2)
    centres = np.eye(6, dtype=np.float32) * 4
    labels = np.array([0, 0, 1, 1, 2, 3] * 8)
    cluster = np.tile(np.arange(6), 8)
    buffer = indexed(60)
    items = centres[cluster] + rng.normal(0, 0.2, size=(48, 6)).astype(np.float32)
    buffer.add(items, labels, np.zeros(48, np.int64))
    queries = centres[[0, 3, 4, 5]] + rng.normal(0, 0.2, size=(4, 6)).astype(np.float32)
    for head in ("ncm", "knn"):
        scores = buffer.predict_scores(queries, head)  # type: ignore[arg-type]
        assert scores.shape == (4, 4)
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
        assert scores.argmax(axis=1).tolist() == [0, 1, 2, 3]


def test_ncm_ignores_classes_without_items() -> None:
    buffer = indexed(10)
    buffer.add(np.eye(6, dtype=np.float32)[:2], np.array([1, 3]), np.zeros(2, np.int64))
    scores = buffer.predict_scores(np.eye(6, dtype=np.float32)[:2], "ncm")
    assert scores[:, [0, 2]].max() == 0.0 and scores.argmax(axis=1).tolist() == [1, 3]


def test_long_random_stream_keeps_buffer_and_index_in_agreement() -> None:
    """20,000 arrivals of near-duplicate-prone data through a small deduplicating memory
    (stores, evictions, refreshes, non-finite rows) with a query every batch: at the end
    every indexed row is the embedding of its slot's item, and queries stay exact."""
    rng = np.random.default_rng(5)
    embed = input_embedding("float32")
    buffer = indexed(64, policy="class-balanced", dedup=0.5)
    prototypes = rng.normal(size=(40, 6)).astype(np.float32)
    for step in range(2000):
        pick = rng.integers(0, 40, 10)
        features = prototypes[pick] + rng.normal(0, 0.05, size=(10, 6)).astype(np.float32)
        if step % 97 == 0:
            features[0, 0] = np.nan
        buffer.add(features, pick % 4, np.full(10, step))
        buffer.search(embed(features[1:]), 5)
    assert buffer.index is not None and buffer.refreshed > 1000
    finite = np.isfinite(buffer.store.features).all(axis=1)
    np.testing.assert_array_equal(buffer.index.indexed, finite)
    np.testing.assert_allclose(
        buffer.index.embeddings[finite], embed(buffer.store.features[finite]), atol=1e-6
    )
    queries = embed(rng.normal(size=(8, 6)).astype(np.float32))
    _, labels = buffer.search(queries, 6)
    slots = np.flatnonzero(finite)
    order = slots[brute_force(buffer.index.embeddings[slots], queries, 6)]
    np.testing.assert_array_equal(labels, buffer.store.labels[order])


def test_condensed_centroids_find_the_clusters_of_each_class() -> None:
    """Class 0 arrives from two tight clusters, class 1 from one: after a few stages the
    two centroids of class 0 sit on its clusters, and replay draws include them."""
    rng = np.random.default_rng(3)
    a, b, c = (np.full(6, v, np.float32) for v in (-3.0, 3.0, 10.0))
    buffer = ReplayBuffer(8, (6,), "float32", num_classes=2, condensed=2)  # 4 raw + 2 x 2
    assert buffer.store.capacity == 4 and buffer.capacity == 8
    for step in range(100):  # 100 arrivals per class: 2 stages of 40 (20 x 2 centroids)
        centre = np.stack([a if step % 2 else b, c])
        features = (centre + rng.normal(0, 0.1, size=(2, 6))).astype(np.float32)
        buffer.add(features, np.array([0, 1]), np.array([step, step]))
    assert buffer.condensed is not None and len(buffer) == 8
    centroids = buffer.condensed.exemplars
    found = sorted(centroids[0].mean(axis=1).round().tolist())
    assert found == [-3.0, 3.0]
    np.testing.assert_allclose(centroids[1], 10.0, atol=0.2)
    draw = buffer.sample(400, torch.Generator().manual_seed(0))
    condensed_rows = np.isin(draw.features[:, 0].numpy(), centroids[:, :, 0].ravel())
    assert 0.35 < condensed_rows.mean() < 0.65  # half the items are condensed (sd 0.025)


def test_condensed_set_round_trips_and_guards_the_budget() -> None:
    a = ReplayBuffer(30, (4,), "uint8", num_classes=3, condensed=2, seed=1)
    rng = np.random.default_rng(0)
    for step in range(50):
        features = rng.integers(0, 255, size=(6, 4)).astype(np.uint8)
        a.add(features, np.arange(6) % 3, np.full(6, step))
    saved = io.BytesIO()
    torch.save(a.state_dict(), saved)
    saved.seek(0)
    b = ReplayBuffer(30, (4,), "uint8", num_classes=3, condensed=2, seed=1)
    b.load_state_dict(torch.load(saved, weights_only=True))
    more = rng.integers(0, 255, size=(60, 4)).astype(np.uint8)
    for buffer in (a, b):  # both continue the stream identically
        buffer.add(more, np.arange(60) % 3, np.zeros(60, np.int64))
    da, db = (x.sample(50, torch.Generator().manual_seed(2)) for x in (a, b))
    assert torch.equal(da.features, db.features) and da.features.dtype == torch.uint8
    with pytest.raises(ConfigError, match="cannot hold 10 condensed exemplars"):
        ReplayBuffer(30, (4,), num_classes=3, condensed=10)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs faiss with GPU support and a GPU")
def test_gpu_index_answers_like_the_cpu_index() -> None:
    rng = np.random.default_rng(4)
    cpu, gpu = EmbeddingIndex(50, 8), EmbeddingIndex(50, 8, device="cuda")
    for _ in range(5):
        slots = rng.choice(50, 20, replace=False)
        rows = rng.normal(size=(20, 8)).astype(np.float32)
        rows[0, 0] = np.nan
        for index in (cpu, gpu):
            index.write(slots, rows)
        queries = rng.normal(size=(4, 8)).astype(np.float32)
        np.testing.assert_array_equal(cpu.search(queries, 6)[1], gpu.search(queries, 6)[1])


def digits_learner(**settings: object) -> tuple[OnlineLearner, Batch]:
    """An ER learner on 8x8 digits whose memory indexes penultimate features (the default)."""
    spec = StreamSpec((8, 8), "uint8", 10)
    config = LearnerConfig(predict_head="knn", memory=60, hidden=(32,), threads=1, **settings)  # type: ignore[arg-type]
    data = load_digits()
    ids = np.arange(200, dtype=np.int64)
    batch = Batch(data.train_x[:200], data.train_y[:200], ids * 0, ids, ids * 0)
    return build_learner(config, spec), batch


def test_penultimate_embedding_is_the_classifiers_unit_input_and_keeps_the_mode() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    model.train()
    embed = penultimate_embedding(model, "uint8", torch.device("cpu"))
    features = np.random.default_rng(0).integers(0, 255, size=(5, 8, 8)).astype(np.uint8)
    rows = embed(features)
    trunk = model[:3](torch.from_numpy(features).float() / 255.0)
    expected = (trunk / trunk.norm(dim=1, keepdim=True)).detach().numpy()
    np.testing.assert_allclose(rows, expected, atol=1e-6)
    assert model.training and rows.shape == (5, 16)
    with pytest.raises(ConfigError, match=r"needs a model whose classifier is an nn\.Linear"):
        penultimate_embedding(nn.Sequential(nn.Flatten()), "uint8", torch.device("cpu"))


def test_penultimate_embeddings_go_stale_and_a_boundary_refreshes_every_item() -> None:
    learner, batch = digits_learner(memory_refresh=0)  # no per-update budget: only boundaries
    memory = learner.memory
    assert memory is not None and memory.index is not None and memory.embed is not None
    assert memory.index.dim == 32  # the hidden layer, not the pooled input
    for start in range(0, 200, 10):
        rows = slice(start, start + 10)
        parts = (batch.features, batch.labels, batch.tasks, batch.sample_ids, batch.tasks)
        learner.learn(Batch(*(a[rows] for a in parts)))
    size = memory.store.size
    fresh = memory.embed(memory.store.features[:size])
    assert np.abs(memory.index.embeddings[:size] - fresh).max() > 1e-3  # stale
    learner._boundary("task", 1, learner.samples)
    np.testing.assert_allclose(memory.index.embeddings[:size], fresh, atol=1e-6)


def test_checkpoint_restores_embeddings_and_rebuilds_ones_that_disagree(
    caplog: pytest.LogCaptureFixture,
) -> None:
    learner, batch = digits_learner(memory_retrieval="neighbours")
    learner.learn(batch)
    memory = learner.memory
    assert memory is not None and memory.index is not None
    state = memory.state_dict()
    twin, _ = digits_learner(memory_retrieval="neighbours")
    twin.model.load_state_dict(learner.model.state_dict())
    assert twin.memory is not None and twin.memory.index is not None
    twin.memory.load_state_dict(state)
    np.testing.assert_array_equal(twin.memory.index.embeddings, memory.index.embeddings)
    near, near_labels = batch.features[:10], batch.labels[:10]
    draws = [
        m.sample(20, torch.Generator().manual_seed(1), near=near, near_labels=near_labels)
        for m in (memory, twin.memory)
    ]
    assert torch.equal(draws[0].features, draws[1].features)
    state["embeddings"] = state["embeddings"][:-1]  # one row short: disagrees with the items
    with caplog.at_level("WARNING"):
        twin.memory.load_state_dict(state)
    assert "re-embedding the items" in caplog.text
    size = memory.store.size
    np.testing.assert_allclose(
        twin.memory.index.embeddings[:size], memory.embed(memory.store.features[:size]), atol=1e-6
    )


def test_replay_report_says_what_the_memory_holds(digits_stream: Path) -> None:
    config = ReplayConfig(stream=digits_stream, threads=1, memory=200, predict_head="knn")
    memory = run_replay(config, progress=False)["memory"]
    assert memory["backend"] == "faiss-cpu-flat"
    assert memory["items"] == memory["indexed_items"] == 200
    assert memory["bytes"]["embeddings"] == 200 * 256 * 4  # MLP-256's penultimate features
    assert memory["bytes"]["features"] == 200 * (64 + 16) and memory["bytes"]["condensed"] == 0


def test_virtual_update_raises_the_loss_of_other_labels_and_lowers_its_own() -> None:
    """A step on a batch labelled 0 makes the same inputs more likely 0: their loss under
    label 0 falls and under label 1 rises; interfered retrieval replays the latter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    scorer = virtual_update(model, 0.5, "float32", torch.device("cpu"))
    batch = rows(8)
    score = scorer(batch, np.zeros(8, np.int64))
    assert (score(batch, np.zeros(8, np.int64)) < 0).all()
    assert (score(batch, np.ones(8, np.int64)) > 0).all()
    buffer = indexed(16, retrieval="interfered")
    buffer.add(np.concatenate([batch, batch]), np.repeat([0, 1], 8), np.zeros(16, np.int64))
    draw = buffer.sample(
        8, torch.Generator(), near=batch, near_labels=np.zeros(8, np.int64), interference=scorer
    )
    # Half the draws are the most interfered: the label-1 copies the step would hurt.
    assert (draw.labels[:4] == 1).all()
