"""Noise filters, quarantine and the training loss: hand-computed cases and references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from streamcl.ingest.errors import ConfigError
from streamcl.ingest.schema import Batch
from streamcl.learner.filters import (
    ABSTAIN,
    FLAG,
    PASS,
    IndexNeighbours,
    NeighbourAgreement,
    NoiseFilter,
    RecentWindow,
    SmallLoss,
    embed_inputs,
    input_embedding,
    mixture_threshold,
)
from streamcl.learner.losses import ClassPriors, RobustLoss, TrainingLoss
from streamcl.learner.quarantine import Quarantine
from streamcl.memory.buffer import ReplayBuffer


def unit(rows: list[list[float]]) -> torch.Tensor:
    return embed_inputs(torch.tensor(rows, dtype=torch.float32))


def test_index_neighbours_equal_a_sorted_reference() -> None:
    """FAISS over the window plus the memory's index gives the brute-force top k."""
    gen = torch.Generator().manual_seed(0)
    window = RecentWindow(50, 8)
    window.add(embed_inputs(torch.rand(30, 8, generator=gen)), torch.arange(30) % 4)
    memory = ReplayBuffer(20, (8,), "float32", num_classes=13, embed=input_embedding("float32"))
    items = torch.rand(20, 8, generator=gen)
    memory.add(items.numpy(), (np.arange(20) % 3 + 10), np.zeros(20, np.int64))
    search = IndexNeighbours(window, memory)
    queries = embed_inputs(torch.rand(5, 8, generator=gen))
    found = search(queries, 7)
    keys = torch.cat([window.embeddings[:30], embed_inputs(items)])
    labels = torch.cat([window.labels[:30], torch.arange(20) % 3 + 10])
    for q, row in zip(queries, found, strict=True):
        order = sorted(range(len(keys)), key=lambda i: -float(q @ keys[i]))[:7]
        assert row.tolist() == labels[order].tolist()


def test_neighbours_pad_with_minus_one_when_few_are_stored() -> None:
    window = RecentWindow(10, 2)
    window.add(unit([[1, 0], [0, 1]]), torch.tensor([3, 4]))
    found = IndexNeighbours(window)(unit([[1, 0.1]]), 4)
    assert found.tolist() == [[3, 4, -1, -1]]


def test_window_index_survives_a_state_round_trip() -> None:
    window = RecentWindow(4, 2)
    window.add(unit([[1, 0], [0, 1], [1, 1], [1, -1], [-1, 0]]), torch.tensor([0, 1, 2, 3, 4]))
    restored = RecentWindow(4, 2)
    restored.load_state_dict(window.state_dict())
    queries = unit([[1, 0.1], [-1, 0.2], [0.1, 1]])
    assert torch.equal(IndexNeighbours(restored)(queries, 4), IndexNeighbours(window)(queries, 4))
    assert restored.index.count == 4  # the oldest arrival (label 0) was pushed out
    assert 0 not in IndexNeighbours(restored)(queries, 4).flatten().tolist()


def test_neighbour_agreement_flags_labels_that_are_not_the_plurality() -> None:
    knn = NeighbourAgreement(dim=2, k=3, window=6)
    # Around (1, 0): labels 0, 0, 1; around (0, 1): labels 1, 1, 1.
    knn.window.add(
        unit([[1, 0], [1, 0.05], [1, 0.1], [0, 1], [0.05, 1], [0.1, 1]]),
        torch.tensor([0, 0, 1, 1, 1, 1]),
    )
    queries = unit([[1, 0.02], [1, 0.02], [0.02, 1], [0.02, 1]])
    verdict = knn.judge(torch.zeros(4), queries, torch.tensor([0, 1, 1, 0]))
    assert verdict.tolist() == [PASS, FLAG, PASS, FLAG]


def test_neighbour_agreement_abstains_until_its_window_is_full_again_after_a_shift() -> None:
    knn = NeighbourAgreement(dim=2, k=1, window=4)
    rows, labels = unit([[1, 0], [0, 1]]), torch.tensor([0, 1])
    for _ in range(2):
        assert knn.judge(torch.zeros(2), rows, labels).tolist() == [ABSTAIN, ABSTAIN]
        knn.observe(torch.zeros(2), rows, labels, np.array([True, False]))
    assert knn.window.count == 4  # suspects too: the window is the stream as it arrived
    assert knn.judge(torch.zeros(2), rows, labels.flip(0)).tolist() == [FLAG, FLAG]
    knn.restart()  # arrivals from before a shift say nothing about the rows after it
    assert knn.window.count == 0
    assert knn.judge(torch.zeros(2), rows, labels.flip(0)).tolist() == [ABSTAIN, ABSTAIN]


def test_plurality_rule_survives_pair_flip_noise() -> None:
    """40% of class 0 labelled 1 (pair flip): clean rows pass, flipped rows are flagged."""
    knn = NeighbourAgreement(dim=2, k=10, window=50)
    gen = np.random.default_rng(0)
    points = np.stack([np.ones(50), gen.normal(0, 0.05, 50)], axis=1)
    labels = np.where(np.arange(50) < 20, 1, 0)
    knn.window.add(unit(points.tolist()), torch.from_numpy(labels))
    verdict = knn.judge(torch.zeros(2), unit([[1, 0.0], [1, 0.0]]), torch.tensor([0, 1]))
    assert verdict.tolist() == [PASS, FLAG]


def test_neighbour_agreement_judges_nothing_in_a_near_uniform_neighbourhood() -> None:
    """Ten neighbours carrying ten different labels (embeddings that do not yet separate
    the classes, as on a new domain) say nothing about a label none of them carries;
    nine neighbours of one label do."""
    spread = unit([[1, 0.01 * i] for i in range(12)])
    query, label = unit([[1, 0]]), torch.tensor([11])  # the 10 nearest carry labels 0-9
    bare = NeighbourAgreement(dim=2, k=10, window=12, min_agreement=0.2)
    floored = NeighbourAgreement(dim=2, k=10, window=12, min_agreement=0.2, min_plurality=0.5)
    for knn in (bare, floored):
        knn.window.add(spread, torch.arange(12))
    assert bare.judge(torch.zeros(1), query, label).tolist() == [FLAG]
    assert floored.judge(torch.zeros(1), query, label).tolist() == [PASS]
    floored.window.add(unit([[1, 0.001 * i] for i in range(9)]), torch.full((9,), 7))
    assert floored.judge(torch.zeros(1), query, label).tolist() == [FLAG]


def test_mixture_threshold_splits_two_modes_and_refuses_one() -> None:
    gen = np.random.default_rng(0)
    bimodal = np.concatenate([gen.normal(-4, 0.5, 600), gen.normal(1, 0.5, 400)])
    threshold = mixture_threshold(bimodal, min_separation=2.0)
    assert -3 < threshold < 0
    assert mixture_threshold(gen.normal(0, 1, 1000), min_separation=2.0) == math.inf


def test_small_loss_abstains_in_warmup_and_for_unlearned_labels() -> None:
    small = SmallLoss(num_classes=3, warmup=20, window=100, refit_every=10, min_class_samples=5)
    gen = np.random.default_rng(1)
    labels = torch.zeros(10, dtype=torch.int64)
    assert (small.judge(torch.ones(10), torch.zeros(10, 2), labels) == ABSTAIN).all()
    for _ in range(10):  # 100 arrivals of class 0: 70 easy, 30 hard
        losses = torch.from_numpy(
            np.concatenate([np.exp(gen.normal(-4, 0.3, 7)), np.exp(gen.normal(1, 0.3, 3))])
        )
        small.observe(losses, torch.zeros(10, 2), labels, np.ones(10, dtype=bool))
    verdict = small.judge(
        torch.tensor([0.01, 5.0, 5.0]), torch.zeros(3, 2), torch.tensor([0, 0, 2])
    )
    assert verdict.tolist() == [PASS, FLAG, ABSTAIN]  # class 2: no admitted sample yet


def test_small_loss_starts_over_after_a_shift() -> None:
    """A new task is high-loss everywhere: judged against the old mixture it all looks noisy."""
    small = SmallLoss(num_classes=1, warmup=20, window=100, refit_every=10, min_class_samples=5)
    gen = np.random.default_rng(2)
    labels = torch.zeros(10, dtype=torch.int64)
    for _ in range(10):
        losses = np.concatenate([np.exp(gen.normal(-4, 0.3, 7)), np.exp(gen.normal(1, 0.3, 3))])
        small.observe(torch.from_numpy(losses), torch.zeros(10, 2), labels, np.ones(10, bool))
    new_task = torch.full((10,), 3.0)
    assert (small.judge(new_task, torch.zeros(10, 2), labels) == FLAG).all()
    NoiseFilter([small]).restart()
    assert (small.judge(new_task, torch.zeros(10, 2), labels) == ABSTAIN).all()
    assert math.isinf(small.threshold)


def test_noise_filter_names_the_first_filter_that_flagged() -> None:
    class Always:
        def __init__(self, name: str, verdict: int):
            self.name, self.verdict = name, verdict

        def judge(self, losses, embeddings, labels):  # type: ignore[no-untyped-def]
            return np.full(len(labels), self.verdict)

    combined = NoiseFilter([Always("a", ABSTAIN), Always("b", FLAG), Always("c", FLAG)])  # type: ignore[list-item]
    assert combined.judge(torch.zeros(2), torch.zeros(2, 1), torch.zeros(2)) == ["b", "b"]


def batch_of(n: int, start: int = 0) -> Batch:
    ids = np.arange(start, start + n, dtype=np.int64)
    return Batch(
        np.zeros((n, 2), np.uint8) + ids[:, None].astype(np.uint8),
        ids % 3,
        np.zeros(n, np.int64),
        ids,
        ids,
    )


def test_quarantine_rechecks_after_delay_then_rejects_after_max_checks() -> None:
    q = Quarantine(capacity=10, recheck_after=5, max_checks=2)
    q.add(batch_of(3), np.array([0, 2]), ["knn", "small-loss"], now=0)
    assert q.due(4) == [] and len(q) == 2
    due = q.due(5)
    assert [h.sample.sample_id for h in due] == [0, 2]
    verdict = q.settle(due, np.array([True, False]), now=5)
    assert [s.sample_id for s in verdict.readmitted] == [0] and verdict.rejected == []
    assert len(q) == 1 and q.due(9) == []
    verdict = q.settle(q.due(10), np.array([False]), now=10)
    assert [h.sample.sample_id for h in verdict.rejected] == [2]
    assert verdict.rejected[0].reason == "small-loss" and len(q) == 0


def test_quarantine_over_capacity_gets_one_last_check() -> None:
    q = Quarantine(capacity=2, recheck_after=100, max_checks=3)
    q.add(batch_of(4), np.arange(4), ["knn"] * 4, now=0)
    due = q.due(1)
    assert [h.sample.sample_id for h in due] == [0, 1]  # the oldest beyond capacity
    verdict = q.settle(due, np.array([False, True]), now=1)
    assert [h.sample.sample_id for h in verdict.rejected] == [0]
    assert [s.sample_id for s in verdict.readmitted] == [1]


def test_quarantine_state_round_trip() -> None:
    q = Quarantine(capacity=10, recheck_after=5)
    q.add(batch_of(4, start=7), np.array([1, 3]), ["knn", "small-loss"], now=3)
    copy = Quarantine(capacity=10, recheck_after=5)
    copy.load_state_dict(q.state_dict())
    assert [(h.sample.sample_id, h.reason, h.since) for h in copy.held] == [
        (8, "knn", 3),
        (10, "small-loss", 3),
    ]
    np.testing.assert_array_equal(copy.held[1].sample.features, q.held[1].sample.features)


def test_quarantine_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError, match="max_checks >= 1"):
        Quarantine(max_checks=0)


def test_plain_loss_is_cross_entropy() -> None:
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    loss = TrainingLoss(4, ace=False, logit_adjust_tau=0.0)
    assert loss.plain
    assert torch.allclose(loss(logits, labels, 3), nn.functional.cross_entropy(logits, labels))


def test_ace_leaves_absent_classes_of_new_rows_untouched() -> None:
    """ER-ACE: new rows' gradient reaches only their batch's classes; replay rows all."""
    logits = torch.randn(4, 5, requires_grad=True)
    labels = torch.tensor([3, 4, 0, 1])  # rows 0-1 new (classes 3, 4), rows 2-3 replayed
    TrainingLoss(5, ace=True, logit_adjust_tau=0.0)(logits, labels, 2).backward()
    assert logits.grad is not None
    assert (logits.grad[:2, :3] == 0).all() and (logits.grad[:2, 3:] != 0).all()
    assert (logits.grad[2:] != 0).all()
    new = nn.functional.cross_entropy(logits[:2, 3:], torch.tensor([0, 1]), reduction="sum")
    old = nn.functional.cross_entropy(logits[2:], labels[2:], reduction="sum")
    expected = (new + old) / 4
    assert torch.allclose(
        TrainingLoss(5, ace=True, logit_adjust_tau=0.0)(logits, labels, 2), expected
    )


def test_ace_counts_a_class_of_the_recent_arrivals_as_present() -> None:
    """A batch of class 0 alone, while class 1 made up a third of the recent arrivals: the
    new rows' loss still sees class 1 (the batch rule alone gives zero loss), not class 2."""
    loss = TrainingLoss(3, ace=True, ace_recent_share=0.05, logit_adjust_tau=0.0)
    logits = torch.tensor([[0.0, 2.0, 5.0]], requires_grad=True)
    batch_rule = TrainingLoss(3, ace=True, ace_recent_share=1.0, logit_adjust_tau=0.0)
    for rule in (loss, batch_rule):
        for _ in range(20):
            rule.priors.update(torch.tensor([0, 0, 1] * 3 + [0]))
    assert batch_rule(logits, torch.tensor([0]), 1).item() == 0.0
    loss(logits, torch.tensor([0]), 1).backward()
    expected = nn.functional.cross_entropy(torch.tensor([[0.0, 2.0]]), torch.tensor([0]))
    assert torch.isclose(loss(logits, torch.tensor([0]), 1), expected)
    assert logits.grad is not None and logits.grad[0, 2] == 0 and logits.grad[0, 1] > 0


def test_class_priors_folded_lazily_equal_priors_folded_at_every_batch() -> None:
    """Queued batches (nothing read them, as under plain cross entropy) fold into the same
    counts and recent shares as a per-batch update, including empty batches, and a
    checkpoint taken between folds holds them."""
    rng = np.random.default_rng(3)
    batches = [rng.integers(0, 4, rng.integers(0, 30)) for _ in range(150)]
    eager, lazy = ClassPriors(4), ClassPriors(4)
    for labels in batches:
        eager.update(labels)
        _ = eager.recent  # a read folds the one queued batch
        lazy.update(labels)
    assert len(lazy._pending) == len(batches) % ClassPriors.FOLD_AFTER  # bounded queue
    restored = ClassPriors(4)
    restored.load_state_dict(lazy.state_dict())
    expected = sum(np.bincount(b, minlength=4) for b in batches)
    for priors in (eager, lazy, restored):
        np.testing.assert_array_equal(priors.counts.numpy(), expected)
    torch.testing.assert_close(lazy.recent, eager.recent, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(restored.recent, eager.recent, rtol=1e-12, atol=1e-15)
    assert eager.recent.sum().item() == pytest.approx(1.0, abs=1e-3)  # shares of recent arrivals
    bad = ClassPriors(4)
    bad.update(np.array([0, 1]))
    bad.update(np.array([4]))  # no fifth class: it must not count as the next batch's 0
    with pytest.raises(ValueError, match="out of range"):
        _ = bad.counts


def test_logit_adjustment_adds_tau_log_prior_to_new_rows() -> None:
    loss = TrainingLoss(3, ace=False, logit_adjust_tau=0.5)
    loss.priors.update(torch.tensor([0] * 7 + [1] * 2))  # counts 7, 2, 0 (+1 smoothing)
    prior = torch.tensor([8.0, 3.0, 1.0]) / 12
    logits, labels = torch.randn(3, 3), torch.tensor([0, 1, 2])
    expected = torch.cat(
        [
            nn.functional.cross_entropy(
                logits[:2] + 0.5 * prior.log(), labels[:2], reduction="none"
            ),
            nn.functional.cross_entropy(logits[2:], labels[2:], reduction="none"),
        ]
    ).mean()
    assert torch.allclose(loss(logits, labels, 2), expected, atol=1e-6)


def test_robust_losses_match_their_formulas() -> None:
    logits, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    p = torch.softmax(logits, dim=1)[torch.arange(5), labels]
    gce = TrainingLoss(4, robust="gce", gce_q=0.7, ace=False, logit_adjust_tau=0.0)
    assert torch.allclose(gce(logits, labels, 5), ((1 - p**0.7) / 0.7).mean(), atol=1e-6)
    sce = TrainingLoss(
        4, robust="sce", sce_alpha=0.1, sce_beta=1.0, ace=False, logit_adjust_tau=0.0
    )
    ce = nn.functional.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(sce(logits, labels, 5), (0.1 * ce + 4.0 * (1 - p)).mean(), atol=1e-6)


def test_effective_number_weights_favour_the_rare_class() -> None:
    loss = TrainingLoss(
        2, ace=False, logit_adjust_tau=0.0, reweight="effective-number", reweight_beta=0.9
    )
    loss.priors.update(torch.tensor([0] * 50 + [1] * 2))
    weights = loss._class_weights()
    assert weights[1] > weights[0] and torch.isclose(weights.mean(), torch.tensor(1.0))
    w0, w1 = (1 - 0.9) / (1 - 0.9**50), (1 - 0.9) / (1 - 0.9**2)
    assert torch.isclose(weights[1] / weights[0], torch.tensor(w1 / w0))


@pytest.mark.parametrize("robust", ["ce", "gce"])
def test_ace_with_logit_adjustment_matches_the_per_row_formula_and_its_gradient(
    robust: RobustLoss,
) -> None:
    """The corrections are one offset added to the logits: loss and gradient equal the
    per-row reference (new rows adjusted, then restricted to their classes), whether the
    new rows' labels are handed over from the host or read from the tensor."""
    loss = TrainingLoss(4, robust=robust, ace=True, logit_adjust_tau=1.0)
    loss.priors.update(np.array([0] * 7 + [1] * 2 + [3]))
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    labels = torch.tensor([0, 1, 1, 2, 3, 0])
    prior = (torch.tensor([8.0, 3.0, 1.0, 2.0]) / 14).log()
    present = torch.tensor([True, True, False, False])  # classes among the 3 new rows
    new = (logits[:3] + prior).masked_fill(~present, torch.finfo(torch.float32).min)
    rows = torch.cat([loss._per_row(new, labels[:3]), loss._per_row(logits[3:], labels[3:])])
    (expected_grad,) = torch.autograd.grad(rows.mean(), logits)
    for new_labels in (labels[:3].numpy(), None):
        value = loss(logits, labels, 3, new_labels)
        (grad,) = torch.autograd.grad(value, logits)
        assert torch.allclose(value, rows.mean(), atol=1e-6)
        assert torch.allclose(grad, expected_grad, atol=1e-6)
