"""Dataset-to-stream builders on scikit-learn's bundled digits and small synthetic sets."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from streamcl.ingest import heldout
from streamcl.ingest.codec import decode
from streamcl.ingest.datasets import LabelledData, load_digits
from streamcl.ingest.errors import ConfigError
from streamcl.ingest.recorded import Frame, StreamReader
from streamcl.ingest.scenarios import (
    EVENT_TIME_BASE_MS,
    BuiltStream,
    ScenarioConfig,
    build,
    corrupt_labels,
    long_tail_indices,
    write,
)
from streamcl.ingest.schema import Sample, StreamSpec


@pytest.fixture(scope="module")
def digits() -> LabelledData:
    return load_digits()


def synthetic(n_per_class: int = 6, num_classes: int = 4, seed: int = 0) -> LabelledData:
    """Random 3x4 images: every pixel column differs, so permutations are recoverable."""
    rng = np.random.default_rng(seed)
    train_y = np.repeat(np.arange(num_classes), n_per_class)
    test_y = np.tile(np.arange(num_classes), 5)
    return LabelledData(
        "synthetic",
        rng.integers(0, 256, (len(train_y), 3, 4), dtype=np.uint8),
        train_y.astype(np.int64),
        rng.integers(0, 256, (len(test_y), 3, 4), dtype=np.uint8),
        test_y.astype(np.int64),
        num_classes,
    )


def rows_with_labels(x: np.ndarray, y: np.ndarray) -> Counter[tuple[bytes, int]]:
    return Counter((row.tobytes(), int(label)) for row, label in zip(x, y, strict=True))


def assert_streams_equal(a: BuiltStream, b: BuiltStream) -> None:
    for name in ("features", "labels", "tasks"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for name in ("features", "labels", "groups", "train_clean_labels", "train_corrupted"):
        np.testing.assert_array_equal(getattr(a.heldout, name), getattr(b.heldout, name))
    assert a.meta == b.meta


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scenario": "domain"}, "scenario must be class-incremental or permuted: 'domain'"),
        ({"tasks": 0}, "tasks must be >= 1, got 0"),
        ({"noise": 1.0}, r"noise must be in \[0, 1\), got 1.0"),
        ({"noise": -0.1}, r"noise must be in \[0, 1\), got -0.1"),
        ({"noise_type": "asym"}, "noise_type must be symmetric or pairflip: 'asym'"),
        ({"imbalance": 0.5}, r"imbalance \(max/min class count\) must be >= 1: 0.5"),
        ({"samples_per_task": 0}, "samples_per_task must be >= 1, got 0"),
    ],
)
def test_bad_config_fails_at_construction(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ScenarioConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("tasks", [3, 4, 7])
def test_class_incremental_needs_classes_divisible_by_tasks(
    digits: LabelledData, tasks: int
) -> None:
    with pytest.raises(ConfigError, match=f"divisible by tasks: 10 classes, {tasks} tasks"):
        build(digits, ScenarioConfig(tasks=tasks))


# --- class-incremental ----------------------------------------------------------------------


@pytest.mark.parametrize("tasks", [1, 2, 5, 10])
def test_class_incremental_split(digits: LabelledData, tasks: int) -> None:
    built = build(digits, ScenarioConfig(tasks=tasks, seed=3))
    per_task = 10 // tasks
    assert built.spec == StreamSpec((8, 8), "uint8", 10)
    # Arrival order: all of task 0, then all of task 1, ...
    np.testing.assert_array_equal(np.unique(built.tasks), np.arange(tasks))
    assert np.all(np.diff(built.tasks) >= 0)
    classes = [set(built.labels[built.tasks == t].tolist()) for t in range(tasks)]
    assert all(len(c) == per_task for c in classes)
    assert set().union(*classes) == set(range(10))  # disjoint: sizes add up to 10
    assert built.meta["task_classes"] == [sorted(c) for c in classes]
    # Every training sample kept once; only the order changed.
    assert rows_with_labels(built.features, built.labels) == rows_with_labels(
        digits.train_x, digits.train_y
    )


def test_class_incremental_heldout_is_the_clean_test_split_grouped_by_task(
    digits: LabelledData,
) -> None:
    built = build(digits, ScenarioConfig(tasks=5, seed=1))
    held = built.heldout
    np.testing.assert_array_equal(held.features, digits.test_x)
    np.testing.assert_array_equal(held.labels, digits.test_y)
    assert held.group_kind == "task"
    for t, classes in enumerate(built.meta["task_classes"]):
        np.testing.assert_array_equal(held.groups == t, np.isin(digits.test_y, classes))
    np.testing.assert_array_equal(held.train_clean_labels, built.labels)
    assert not held.train_corrupted.any()


def test_samples_per_task_caps_each_task(digits: LabelledData) -> None:
    built = build(digits, ScenarioConfig(tasks=5, samples_per_task=20))
    np.testing.assert_array_equal(np.bincount(built.tasks), [20] * 5)
    assert built.meta["num_messages"] == 100


def test_same_seed_same_stream_other_seed_other_class_order(digits: LabelledData) -> None:
    a = build(digits, ScenarioConfig(tasks=5, noise=0.2, seed=7))
    b = build(digits, ScenarioConfig(tasks=5, noise=0.2, seed=7))
    assert_streams_equal(a, b)
    c = build(digits, ScenarioConfig(tasks=5, noise=0.2, seed=8))
    assert c.meta["task_classes"] != a.meta["task_classes"]
    assert not np.array_equal(c.labels, a.labels)


def test_seed_0_class_order_is_pinned(digits: LabelledData) -> None:
    # Regression pin: changing this silently changes every recorded benchmark stream.
    built = build(digits, ScenarioConfig(tasks=5, seed=0))
    assert built.meta["task_classes"] == [[4, 6], [2, 7], [3, 5], [0, 9], [1, 8]]


def test_meta_records_the_config(digits: LabelledData) -> None:
    config = ScenarioConfig(tasks=2, noise=0.1, noise_type="pairflip", imbalance=2.0, seed=4)
    built = build(digits, config)
    expected = {
        "dataset": "digits",
        "scenario": "class-incremental",
        "tasks": 2,
        "noise": 0.1,
        "noise_type": "pairflip",
        "imbalance": 2.0,
        "seed": 4,
        "num_messages": len(built.labels),
    }
    assert expected.items() <= built.meta.items()


# --- permuted -------------------------------------------------------------------------------


def recover_permutation(original: np.ndarray, permuted: np.ndarray) -> np.ndarray:
    """The p with permuted == original[:, p]; each column must match exactly one column."""
    p = []
    for j in range(permuted.shape[1]):
        (matches,) = np.nonzero((original == permuted[:, [j]]).all(axis=0))
        assert len(matches) == 1, f"column {j} matches original columns {matches}"
        p.append(int(matches[0]))
    p_arr = np.array(p)
    np.testing.assert_array_equal(np.sort(p_arr), np.arange(original.shape[1]))
    return p_arr


def test_permuted_tasks_are_fixed_pixel_permutations() -> None:
    data = synthetic()
    tasks = 4
    built = build(data, ScenarioConfig(scenario="permuted", tasks=tasks, seed=5))
    held = built.heldout
    test_flat = data.test_x.reshape(len(data.test_x), -1)
    perms = []
    for t in range(tasks):
        held_t = held.features[held.groups == t].reshape(len(data.test_x), -1)
        p = recover_permutation(test_flat, held_t)
        perms.append(p)
        np.testing.assert_array_equal(held.labels[held.groups == t], data.test_y)
        # The training images of task t use the very same permutation, labels unchanged.
        train_t = built.features[built.tasks == t].reshape(-1, test_flat.shape[1])
        unpermuted = np.empty_like(train_t)
        unpermuted[:, p] = train_t
        assert rows_with_labels(unpermuted, built.labels[built.tasks == t]) == rows_with_labels(
            data.train_x.reshape(len(data.train_x), -1), data.train_y
        )
    np.testing.assert_array_equal(perms[0], np.arange(12))  # task 0 is the identity
    assert len({p.tobytes() for p in perms}) == tasks


def test_permuted_on_digits_layout(digits: LabelledData) -> None:
    tasks = 3
    built = build(digits, ScenarioConfig(scenario="permuted", tasks=tasks, seed=0))
    n_train, n_test = len(digits.train_y), len(digits.test_y)
    np.testing.assert_array_equal(built.tasks, np.repeat(np.arange(tasks), n_train))
    np.testing.assert_array_equal(built.heldout.groups, np.repeat(np.arange(tasks), n_test))
    np.testing.assert_array_equal(built.heldout.labels, np.tile(digits.test_y, tasks))
    np.testing.assert_array_equal(built.heldout.features[:n_test], digits.test_x)
    assert not np.array_equal(built.heldout.features[n_test : 2 * n_test], digits.test_x)
    # Task 0 is the unpermuted training set, reordered.
    assert rows_with_labels(built.features[:n_train], built.labels[:n_train]) == (
        rows_with_labels(digits.train_x, digits.train_y)
    )
    for t in range(tasks):
        assert Counter(built.labels[built.tasks == t].tolist()) == Counter(digits.train_y.tolist())
    # Pixel values only move: each image keeps its multiset of intensities.
    assert sorted(built.features[built.tasks == 2].ravel().tolist()) == sorted(
        digits.train_x.ravel().tolist()
    )


def test_permuted_samples_per_task(digits: LabelledData) -> None:
    built = build(digits, ScenarioConfig(scenario="permuted", tasks=3, samples_per_task=25))
    np.testing.assert_array_equal(built.tasks, np.repeat(np.arange(3), 25))


# --- label noise ----------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.6])
def test_symmetric_noise(digits: LabelledData, rate: float) -> None:
    built = build(digits, ScenarioConfig(tasks=5, noise=rate, seed=2))
    clean, corrupted = built.heldout.train_clean_labels, built.heldout.train_corrupted
    assert abs(corrupted.mean() - rate) < 0.05
    assert np.all(built.labels[corrupted] != clean[corrupted])
    np.testing.assert_array_equal(built.labels[~corrupted], clean[~corrupted])
    # Symmetric: every other class is reachable (1,348 x rate flips cover all 9 shifts).
    shifts = (built.labels[corrupted] - clean[corrupted]) % 10
    assert set(shifts.tolist()) == set(range(1, 10))
    np.testing.assert_array_equal(built.heldout.labels, digits.test_y)  # held-out stays clean
    assert rows_with_labels(built.features, clean) == rows_with_labels(
        digits.train_x, digits.train_y
    )


def test_pairflip_noise_maps_c_to_c_plus_1(digits: LabelledData) -> None:
    built = build(digits, ScenarioConfig(tasks=5, noise=0.4, noise_type="pairflip", seed=2))
    clean, corrupted = built.heldout.train_clean_labels, built.heldout.train_corrupted
    assert abs(corrupted.mean() - 0.4) < 0.05
    np.testing.assert_array_equal(built.labels[corrupted], (clean[corrupted] + 1) % 10)
    np.testing.assert_array_equal(built.labels[~corrupted], clean[~corrupted])
    np.testing.assert_array_equal(built.heldout.labels, digits.test_y)


def test_no_noise_means_no_corruption(digits: LabelledData) -> None:
    built = build(digits, ScenarioConfig(tasks=2, noise=0.0))
    assert not built.heldout.train_corrupted.any()
    np.testing.assert_array_equal(built.labels, built.heldout.train_clean_labels)


def test_corrupt_labels_on_a_hand_made_case() -> None:
    labels = np.array([0, 1, 2, 3, 4, 4, 0])
    noisy, corrupted = corrupt_labels(labels, 5, 0.999_999, "pairflip", np.random.default_rng(0))
    assert corrupted.all()
    np.testing.assert_array_equal(noisy, [1, 2, 3, 4, 0, 0, 1])
    np.testing.assert_array_equal(labels, [0, 1, 2, 3, 4, 4, 0])  # input not modified
    noisy, corrupted = corrupt_labels(labels, 5, 0.0, "symmetric", np.random.default_rng(0))
    assert not corrupted.any()
    np.testing.assert_array_equal(noisy, labels)


def test_symmetric_corruption_never_returns_the_true_label() -> None:
    labels = np.repeat(np.arange(3), 2000)
    noisy, corrupted = corrupt_labels(labels, 3, 0.5, "symmetric", np.random.default_rng(1))
    assert np.all(noisy[corrupted] != labels[corrupted])
    # Both other classes equally likely: 1,000 flips per class split ~500/500.
    for c in range(3):
        flipped = noisy[corrupted & (labels == c)]
        counts = np.bincount(flipped, minlength=3)
        assert counts[c] == 0
        assert abs(counts[(c + 1) % 3] / len(flipped) - 0.5) < 0.06


# --- imbalance ------------------------------------------------------------------------------


def test_long_tail_counts_on_a_hand_computed_case() -> None:
    # C=4, R=8: 16 * 8^(-r/3) = 16, 8, 4, 2 (8^(1/3) = 2). n_max is the smallest class (16).
    labels = np.repeat(np.arange(4), [20, 16, 18, 17])
    keep = long_tail_indices(labels, 4, 8.0, np.random.default_rng(0))
    assert np.all(np.diff(keep) > 0)  # sorted, no repeats
    counts = np.bincount(labels[keep], minlength=4)
    assert sorted(counts.tolist(), reverse=True) == [16, 8, 4, 2]


def test_long_tail_ranks_follow_the_seed() -> None:
    labels = np.repeat(np.arange(4), 16)
    a = np.bincount(labels[long_tail_indices(labels, 4, 8.0, np.random.default_rng(3))])
    b = np.bincount(labels[long_tail_indices(labels, 4, 8.0, np.random.default_rng(3))])
    np.testing.assert_array_equal(a, b)
    orders = {
        tuple(np.bincount(labels[long_tail_indices(labels, 4, 8.0, np.random.default_rng(s))]))
        for s in range(10)
    }
    assert len(orders) > 1


def test_ratio_one_keeps_everything() -> None:
    labels = np.array([2, 0, 1, 1, 0])
    np.testing.assert_array_equal(
        long_tail_indices(labels, 3, 1.0, np.random.default_rng(0)), np.arange(5)
    )


def test_imbalanced_digits_follow_the_formula(digits: LabelledData) -> None:
    # Smallest digits class has 122 training images; 122 * 10^(-r/9), truncated:
    # 122, 94.46, 73.14, 56.63, 43.84, 33.95, 26.28, 20.35, 15.76, 12.2.
    assert np.bincount(digits.train_y).min() == 122
    built = build(digits, ScenarioConfig(tasks=1, imbalance=10.0, seed=0))
    counts = np.bincount(built.heldout.train_clean_labels, minlength=10)
    assert sorted(counts.tolist(), reverse=True) == [122, 94, 73, 56, 43, 33, 26, 20, 15, 12]
    np.testing.assert_array_equal(built.heldout.labels, digits.test_y)  # test split untouched


def test_imbalance_applies_before_the_task_split(digits: LabelledData) -> None:
    built = build(digits, ScenarioConfig(tasks=5, imbalance=4.0, seed=1))
    counts = np.bincount(built.heldout.train_clean_labels, minlength=10)
    assert counts.max() == 122
    assert counts.min() == 30  # rank 9: 122 * 4^-1 = 30.5, truncated
    assert np.all(np.diff(built.tasks) >= 0)


# --- writing --------------------------------------------------------------------------------


def test_write_produces_a_readable_stream_and_sidecar(digits: LabelledData, tmp_path: Path) -> None:
    built = build(digits, ScenarioConfig(tasks=5, samples_per_task=30, noise=0.2, seed=1))
    path = tmp_path / "digits.scs"
    sidecar = write(built, path)
    assert sidecar == tmp_path / "digits.scs.eval.npz"
    with StreamReader(path) as reader:
        assert reader.spec == built.spec
        assert reader.header["task_classes"] == built.meta["task_classes"]
        assert reader.header["num_messages"] == 150
        frames = list(reader)
    assert len(frames) == 150
    for i, frame in enumerate(frames):
        assert isinstance(frame, Frame)
        assert (frame.offset, frame.timestamp_ms) == (i, EVENT_TIME_BASE_MS + i)
        sample = decode(frame.payload, built.spec)
        assert isinstance(sample, Sample)
        assert (sample.label, sample.task, sample.sample_id, sample.event_time_ms) == (
            built.labels[i],
            built.tasks[i],
            i,
            EVENT_TIME_BASE_MS + i,
        )
        np.testing.assert_array_equal(sample.features, built.features[i])
    loaded = heldout.load(sidecar)
    for name in ("features", "labels", "groups", "train_clean_labels", "train_corrupted"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(built.heldout, name))
    assert loaded.group_kind == "task"
    assert loaded.train_corrupted.sum() == built.heldout.train_corrupted.sum() > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.scs", "digits.scs.eval.npz"]
