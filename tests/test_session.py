"""LearningSession: batching, task boundaries, periodic evaluation, accounting, resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from streamcl.deploy.runtime.config import LearnerConfig
from streamcl.deploy.runtime.session import LearningSession
from streamcl.deploy.runtime.wiring import build_learner
from streamcl.ingest import heldout as heldout_io
from streamcl.ingest.codec import decode
from streamcl.ingest.heldout import HeldOut
from streamcl.ingest.recorded import Frame, StreamReader
from streamcl.ingest.schema import Batch, Origin, Rejected, Sample, StreamSpec
from streamcl.learner.loop import OnlineLearner

SPEC = StreamSpec((8, 8), "uint8", 10)
CONFIG = LearnerConfig(strategy="er", memory=50, hidden=(16,), device="cpu")


@pytest.fixture(scope="module")
def stream_samples(digits_stream: Path) -> list[Sample]:
    """Every message of the digits stream, decoded, in arrival order."""
    out = []
    with StreamReader(digits_stream) as reader:
        assert reader.spec == SPEC
        for frame in reader:
            assert isinstance(frame, Frame)
            sample = decode(frame.payload, reader.spec, Origin("digits-ci", 0, frame.offset))
            assert isinstance(sample, Sample)
            out.append(sample)
    return out


@pytest.fixture(scope="module")
def digits_heldout(digits_stream: Path) -> HeldOut:
    return heldout_io.load(heldout_io.sidecar_path(digits_stream))


@pytest.fixture(scope="module")
def task_sizes(stream_samples: list[Sample]) -> list[int]:
    """Samples per task, in stream order (tasks arrive one after another)."""
    tasks = np.array([s.task for s in stream_samples])
    boundaries = np.flatnonzero(np.diff(tasks)) + 1
    assert tasks[0] == 0 and tasks[boundaries].tolist() == [1, 2, 3, 4]
    return np.diff(np.concatenate([[0], boundaries, [len(tasks)]])).tolist()


def learner() -> OnlineLearner:
    return build_learner(CONFIG, SPEC)


def params(model_owner: OnlineLearner) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model_owner.model.parameters()]


def assert_same_params(a: OnlineLearner, b: OnlineLearner) -> None:
    pa, pb = params(a), params(b)
    assert len(pa) == len(pb)
    for i, (x, y) in enumerate(zip(pa, pb, strict=True)):
        assert torch.equal(x, y), f"parameter {i} differs"


def assert_state_equal(a: Any, b: Any, where: str = "state") -> None:
    """Nested dicts/lists of tensors and scalars are equal, tensors exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_state_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_state_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("n", [50, 57])
def test_offering_one_by_one_equals_learning_manual_batches(
    stream_samples: list[Sample], n: int
) -> None:
    samples = stream_samples[:n]  # all of task 0: no boundary inside
    fed, manual = learner(), learner()
    initial = params(manual)
    session = LearningSession(fed, None, batch_size=10)
    for sample in samples:
        session.offer(sample)
    full = n - n % 10
    for start in range(0, full, 10):
        manual.learn(Batch.from_samples(samples[start : start + 10]))
    assert fed.updates == manual.updates == n // 10
    assert_same_params(fed, manual)
    assert session.report()["samples_pending"] == n % 10

    session.flush()
    if n % 10:
        manual.learn(Batch.from_samples(samples[full:]))
    assert fed.updates == manual.updates == -(-n // 10)
    assert_same_params(fed, manual)
    assert_state_equal(fed.state_dict(), manual.state_dict())
    assert not all(torch.equal(a, b) for a, b in zip(initial, params(fed), strict=True))


def test_task_boundaries_flush_the_partial_batch_and_evaluate(
    stream_samples: list[Sample], digits_heldout: HeldOut, task_sizes: list[int]
) -> None:
    learned: list[Batch] = []
    session = LearningSession(
        learner(),
        digits_heldout,
        batch_size=10,
        on_learned=lambda batch, _seconds: learned.append(batch),
    )
    rows_at_boundary = []
    for i, sample in enumerate(stream_samples):
        if i and sample.task != stream_samples[i - 1].task:
            before = len(session.matrix.rows)
            session.offer(sample)
            rows_at_boundary.append(len(session.matrix.rows) - before)
        else:
            session.offer(sample)
    session.flush()
    session.evaluate()

    assert rows_at_boundary == [1, 1, 1, 1]
    assert session.matrix.points == np.cumsum(task_sizes).tolist()
    assert session.matrix.matrix.shape == (5, 5)
    assert session.matrix.learned_at.tolist() == [0, 1, 2, 3, 4]
    expected_sizes = []
    for size in task_sizes:
        expected_sizes += [10] * (size // 10) + ([size % 10] if size % 10 else [])
    assert [len(b) for b in learned] == expected_sizes
    assert all(len(np.unique(b.tasks)) == 1 for b in learned)  # no batch spans a boundary
    report = session.report()
    assert report["samples_seen"] == sum(task_sizes)
    assert report["samples_pending"] == 0 and report["accounting_holds"]
    assert len(report["accuracy_matrix"]) == len(report["accuracy_curve"]) == 5
    # A second final evaluation at the same point adds nothing.
    session.evaluate()
    assert len(session.matrix.rows) == 5


@pytest.mark.parametrize(
    ("batch_size", "eval_every", "points", "final_points"),
    [
        (10, 25, [30, 50, 80, 100], [30, 50, 80, 100]),
        (10, 10, list(range(10, 101, 10)), list(range(10, 101, 10))),
        (10, 40, [40, 80], [40, 80, 100]),
        (7, 20, [21, 42, 63, 84], [21, 42, 63, 84, 100]),
    ],
)
def test_eval_every_adds_rows_at_the_first_flush_past_each_multiple(
    stream_samples: list[Sample],
    digits_heldout: HeldOut,
    batch_size: int,
    eval_every: int,
    points: list[int],
    final_points: list[int],
) -> None:
    session = LearningSession(learner(), digits_heldout, batch_size, eval_every=eval_every)
    for sample in stream_samples[:100]:  # task 0 only: no boundary evaluations
        session.offer(sample)
    assert session.matrix.points == points
    assert [row["samples_seen"] for row in session.curve] == points
    session.flush()
    session.evaluate()
    assert session.matrix.points == final_points


def test_reject_counts_by_reason_and_every_message_is_accounted(
    stream_samples: list[Sample],
) -> None:
    session = LearningSession(learner(), None, batch_size=10)
    payloads = [b"\x00junk", b"SC\x01", b"{not json", b"\xffmore junk"]
    reasons = []
    for payload in payloads:
        rejected = decode(payload, SPEC)
        assert isinstance(rejected, Rejected)
        reasons.append(rejected.reason)
    assert reasons == ["garbage", "truncated", "bad_json", "garbage"]
    for i, sample in enumerate(stream_samples[:23]):
        session.offer(sample)
        if i % 6 == 0:
            session.reject(reasons[i // 6])

    report = session.report()
    assert report["samples_seen"] == 27
    # Each valid sample that reached the learner was learned or is in quarantine (or
    # rejected as noisy after re-examination).
    assert (
        report["samples_learned"] + report["samples_quarantined"] + report["samples_rejected_noisy"]
        == 20
    )
    assert report["accounting_holds"]
    assert report["samples_rejected"] == 4
    assert report["samples_pending"] == 3
    assert report["rejected_by_reason"] == {"bad_json": 1, "garbage": 2, "truncated": 1}
    assert report["updates"] == 2
    assert report["samples_seen"] == (
        report["samples_learned"]
        + report["samples_quarantined"]
        + report["samples_rejected_noisy"]
        + report["samples_rejected"]
        + report["samples_pending"]
    )
    with_frames = session.report(corrupt_frames=2)
    assert with_frames["corrupt_frames"] == 2
    # Damaged file regions are not messages: the rejected counts stay consistent.
    assert with_frames["rejected_by_reason"] == report["rejected_by_reason"]
    assert sum(with_frames["rejected_by_reason"].values()) == with_frames["samples_rejected"]


def test_on_learned_receives_every_batch_with_origins_in_order(
    stream_samples: list[Sample],
) -> None:
    learned: list[Batch] = []
    session = LearningSession(
        learner(), None, batch_size=10, on_learned=lambda batch, _seconds: learned.append(batch)
    )
    samples = stream_samples[:35]
    for sample in samples:
        session.offer(sample)
    assert [len(b) for b in learned] == [10, 10, 10]
    session.flush()
    session.flush()  # nothing pending: no empty batch is reported
    assert [len(b) for b in learned] == [10, 10, 10, 5]
    origins = [o for b in learned for o in b.origins]
    assert origins == [Origin("digits-ci", 0, i) for i in range(35)]
    assert [s.origin for s in samples] == origins
    np.testing.assert_array_equal(
        np.concatenate([b.features for b in learned]), np.stack([s.features for s in samples])
    )
    np.testing.assert_array_equal(
        np.concatenate([b.labels for b in learned]), [s.label for s in samples]
    )


def resume_window(stream_samples: list[Sample], task_sizes: list[int]) -> list[Sample]:
    """100 samples whose task changes after the 63rd (a partial batch at the boundary)."""
    boundary = task_sizes[0]
    return stream_samples[boundary - 63 : boundary + 37]


def feed(session: LearningSession, samples: list[Sample], reject_at: dict[int, str]) -> None:
    for i, sample in enumerate(samples):
        if i in reject_at:
            session.reject(reject_at[i])
        session.offer(sample)


def test_state_round_trip_mid_batch_resumes_exactly(
    tmp_path: Path,
    stream_samples: list[Sample],
    digits_heldout: HeldOut,
    task_sizes: list[int],
) -> None:
    window = resume_window(stream_samples, task_sizes)
    a = LearningSession(learner(), digits_heldout, batch_size=10, eval_every=20)
    feed(a, window[:35], {12: "garbage", 30: "wrong_shape"})
    assert a.learner.updates == 3 and a.report()["samples_pending"] == 5

    path = tmp_path / "state.pt"
    torch.save({"learner": a.learner.state_dict(), "session": a.state_dict()}, path)
    state = torch.load(path, weights_only=True)
    b = LearningSession(
        build_learner(CONFIG.model_copy(update={"seed": 7}), SPEC),
        digits_heldout,
        batch_size=10,
        eval_every=20,
    )
    b.learner.load_state_dict(state["learner"])
    b.load_state_dict(state["session"])

    for session in (a, b):
        feed(session, window[35:], {5: "garbage", 40: "label_out_of_range"})
        session.flush()
        session.evaluate()
    # Every 20 learned, plus the task boundary after 63 (60 learned + 3 flushed there).
    assert a.matrix.points == [20, 40, 60, 63, 83, 100]
    assert a.learner.updates == 11
    assert_same_params(a.learner, b.learner)
    assert_state_equal(b.learner.state_dict(), a.learner.state_dict())
    assert b.report() == a.report()


def test_evaluate_right_after_a_restore_adds_no_duplicate_row(
    stream_samples: list[Sample], digits_heldout: HeldOut
) -> None:
    """A service that stopped after its final evaluation and restarts with nothing new
    must not record a second row at the same point."""
    a = LearningSession(learner(), digits_heldout, batch_size=10)
    for sample in stream_samples[:30]:
        a.offer(sample)
    a.flush()
    a.evaluate()
    a.evaluate()
    assert a.matrix.points == [30]

    b = LearningSession(learner(), digits_heldout, batch_size=10)
    b.learner.load_state_dict(a.learner.state_dict())
    b.load_state_dict(a.state_dict())
    b.flush()
    b.evaluate()
    assert b.matrix.points == [30]


def test_pending_samples_survive_the_state_exactly(stream_samples: list[Sample]) -> None:
    a = LearningSession(learner(), None, batch_size=10)
    for sample in stream_samples[:17]:
        a.offer(sample)
    b = LearningSession(learner(), None, batch_size=10)
    b.load_state_dict(a.state_dict())
    assert b.report()["samples_pending"] == 7
    learned: list[Batch] = []
    b.on_learned = lambda batch, _seconds: learned.append(batch)
    b.flush()
    assert b.learner.updates == 1  # pending samples were not learned by state_dict()
    (batch,) = learned
    expected = Batch.from_samples(stream_samples[10:17])
    for name in ("features", "labels", "tasks", "sample_ids", "event_times_ms"):
        np.testing.assert_array_equal(getattr(batch, name), getattr(expected, name))
        assert getattr(batch, name).dtype == getattr(expected, name).dtype
    assert batch.origins == expected.origins


def test_offering_batches_equals_offering_each_sample(
    stream_samples: list[Sample], digits_heldout: HeldOut, task_sizes: list[int]
) -> None:
    """Uneven chunks straddling the first task boundary: same updates, evaluations, state."""
    n = task_sizes[0] + 26
    one, many = (LearningSession(learner(), digits_heldout, batch_size=10) for _ in range(2))
    for sample in stream_samples[:n]:
        one.offer(sample)
    start = 0
    for size in (7, 25, task_sizes[0] - 40, 3, 31):  # the boundary is row 5 of the 31
        many.offer_batch(Batch.from_samples(stream_samples[start : start + size]))
        start += size
    assert start == n
    assert one.learner.updates == many.learner.updates and many.pending == n % 10 != 0
    assert one.matrix.points == many.matrix.points == [task_sizes[0]]
    assert_same_params(one.learner, many.learner)
    assert_state_equal(one.state_dict(), many.state_dict())
    assert one.report() == many.report()
