"""Continual-learning metrics on hand-computed matrices; trackers against batch recomputation."""

from __future__ import annotations

import numpy as np
import pytest

from streamcl.evaluation import metrics
from streamcl.evaluation.probes import evaluate
from streamcl.evaluation.tracker import AccuracyMatrix, PrequentialAccuracy

# Three tasks learned in order; row i is measured right after task i.
R = np.array(
    [
        [0.90, 0.00, 0.00],
        [0.60, 0.80, 0.00],
        [0.50, 0.70, 0.95],
    ]
)


def test_average_accuracy_counts_only_seen_groups() -> None:
    seen = np.array([True, True, False])
    assert metrics.average_accuracy(R[1], seen) == pytest.approx(0.70)
    assert metrics.average_accuracy(R[2], np.ones(3, bool)) == pytest.approx(2.15 / 3)
    assert metrics.average_accuracy(R[0], np.zeros(3, bool)) == 0.0


def test_forgetting_is_best_past_accuracy_minus_current() -> None:
    np.testing.assert_allclose(metrics.forgetting(R, 2), [0.40, 0.10, -0.95])
    np.testing.assert_allclose(metrics.forgetting(R, 0), [0.0, 0.0, 0.0])


def test_average_forgetting_excludes_newest_and_unseen() -> None:
    seen = np.ones(3, bool)
    newest = np.array([False, False, True])
    assert metrics.average_forgetting(R, 2, seen, newest) == pytest.approx(0.25)
    seen_1 = np.array([True, True, False])
    newest_1 = np.array([False, True, False])
    assert metrics.average_forgetting(R, 1, seen_1, newest_1) == pytest.approx(0.30)


def test_backward_transfer_compares_last_row_with_row_after_learning() -> None:
    assert metrics.backward_transfer(R, np.array([0, 1, 2])) == pytest.approx(-0.25)
    # Positive transfer: later learning improved an old task.
    improved = np.array([[0.5, 0.0], [0.7, 0.9]])
    assert metrics.backward_transfer(improved, np.array([0, 1])) == pytest.approx(0.2)
    assert metrics.backward_transfer(R[:1], np.array([0, -1, -1])) == 0.0


def test_tracker_matches_pure_functions_after_every_update() -> None:
    tracker = AccuracyMatrix(3)
    for point, row in enumerate(R):
        tracker.observe(np.array([point]))
        summary = tracker.update(row, samples_seen=100 * (point + 1))
        seen = np.arange(3) <= point
        newest = np.arange(3) == point
        assert summary.average_accuracy == pytest.approx(metrics.average_accuracy(row, seen))
        assert summary.average_forgetting == pytest.approx(
            metrics.average_forgetting(R[: point + 1], point, seen, newest)
        )
        assert summary.backward_transfer == pytest.approx(
            metrics.backward_transfer(R[: point + 1], np.where(seen, np.arange(3), -1))
        )
        assert summary.samples_seen == 100 * (point + 1)
    assert tracker.get().average_forgetting == pytest.approx(0.25)
    assert tracker.get().backward_transfer == pytest.approx(-0.25)


def test_tracker_points_between_boundaries_keep_t_g_at_last_training_point() -> None:
    tracker = AccuracyMatrix(2)
    tracker.observe(np.array([0]))
    tracker.update(np.array([0.6, 0.0]), 50)  # mid task 0
    tracker.observe(np.array([0]))
    tracker.update(np.array([0.8, 0.0]), 100)  # end of task 0: t_0 = 1
    tracker.observe(np.array([1]))
    summary = tracker.update(np.array([0.5, 0.9]), 150)
    assert tracker.learned_at.tolist() == [1, 2]
    assert summary.backward_transfer == pytest.approx(0.5 - 0.8)
    assert summary.average_forgetting == pytest.approx(0.8 - 0.5)


def test_bounded_tracker_equals_the_full_matrix_after_every_update() -> None:
    """Rows dropped past `recent` change no metric: each equals the full-matrix reference."""
    rng = np.random.default_rng(1)
    groups, points = 4, 60
    tracker = AccuracyMatrix(groups, recent=3)
    full = []
    learned_at = np.full(groups, -1)
    seen = np.zeros(groups, bool)
    first_rows = []
    for point in range(points):
        # Groups start one after another, then several are trained in each interval.
        trained = (rng.random(groups) < 0.5) & (np.arange(groups) <= point // 10)
        tracker.observe(np.flatnonzero(trained))
        row = rng.random(groups)
        full.append(row)
        if (trained & ~seen).any():
            first_rows.append(point)
        seen |= trained
        learned_at[trained] = point
        summary = tracker.update(row, samples_seen=10 * (point + 1))
        matrix = np.array(full)
        assert summary.average_accuracy == metrics.average_accuracy(row, seen)
        forgetting = metrics.average_forgetting(matrix, point, seen, trained)
        assert summary.average_forgetting == forgetting
        assert summary.backward_transfer == metrics.backward_transfer(matrix, learned_at)
        assert tracker.learned_at.tolist() == learned_at.tolist()
        others = [k for k in range(point + 1) if k not in first_rows][-3:]
        kept = sorted(first_rows + others)
        assert tracker.points == [10 * (k + 1) for k in kept]
        np.testing.assert_array_equal(tracker.matrix, matrix[kept])
    assert tracker.evaluations == points and len(tracker.rows) <= groups + 3
    restored = AccuracyMatrix(groups, recent=3)
    restored.load_state_dict(tracker.state_dict())
    assert restored.get() == tracker.get()
    np.testing.assert_array_equal(restored.group_forgetting(), tracker.group_forgetting())


def test_tracker_rejects_wrong_row_length() -> None:
    with pytest.raises(ValueError, match="expected 3 group accuracies"):
        AccuracyMatrix(3).update(np.array([0.1, 0.2]), 10)


def test_prequential_matches_batch_recomputation_after_every_update() -> None:
    rng = np.random.default_rng(0)
    hits = rng.random(2_000) < 0.7
    tracker = PrequentialAccuracy(window=100)
    consumed = 0
    while consumed < len(hits):
        size = int(rng.integers(1, 37))
        tracker.update(hits[consumed : consumed + size])
        consumed = min(consumed + size, len(hits))
        assert tracker.get() == pytest.approx(hits[:consumed].mean())
        assert tracker.get_windowed() == pytest.approx(
            hits[max(0, consumed - 100) : consumed].mean()
        )


def test_probe_evaluation_scores_groups_and_classes() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    groups = np.array([0, 0, 0, 0, 1, 1])
    predicted = np.array([0, 1, 1, 1, 0, 2])
    result = evaluate(lambda x: predicted, np.zeros((6, 2)), labels, groups, 3, 4)
    np.testing.assert_allclose(result.per_group, [0.75, 0.5, np.nan])
    np.testing.assert_allclose(result.per_class, [0.5, 1.0, 0.5, np.nan])
    assert result.overall == pytest.approx(4 / 6)


def test_group_forgetting_is_null_for_unseen_and_newest_groups() -> None:
    tracker = AccuracyMatrix(3)
    assert np.isnan(tracker.group_forgetting()).all()
    for point, row in enumerate(R[:2]):
        tracker.observe(np.array([point]))
        tracker.update(row, point)
    np.testing.assert_allclose(tracker.group_forgetting(), [0.3, np.nan, np.nan])
