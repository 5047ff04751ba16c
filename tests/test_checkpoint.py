"""Checkpoints and snapshots: rotation, weights-only loading, fallback, atomicity, resume."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from streamcl.deploy.runtime.config import LearnerConfig
from streamcl.deploy.runtime.session import LearningSession
from streamcl.deploy.runtime.wiring import build_learner
from streamcl.ingest.datasets import load_digits
from streamcl.ingest.schema import Origin, Sample, StreamSpec
from streamcl.learner import checkpoint
from streamcl.learner.checkpoint import CheckpointError, CheckpointStore, write_snapshot

SPEC = StreamSpec((8, 8), "uint8", 10)
CONFIG = LearnerConfig(strategy="er", memory=50, hidden=(16,), device="cpu")
UNPICKLED: list[str] = []
"""Filled only if a checkpoint's pickled object were ever rebuilt (it must stay empty)."""


def _mark_unpickled(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class Payload:
    """An arbitrary object: unpickling it would call a function of ours."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_mark_unpickled, ("ran",))


def numbered(sequence: int) -> str:
    return f"checkpoint-{sequence:09d}.pt"


def small_state(i: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(i)
    return {"step": torch.tensor([i]), "w": torch.randn(3, 4, generator=gen), "note": f"n{i}"}


def assert_state_equal(a: Any, b: Any, where: str = "state") -> None:
    """Nested dicts/lists of tensors and scalars are equal, tensors exactly (dtype included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict), where
        assert a.keys() == b.keys(), where
        for key in a:
            assert_state_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple), where
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_state_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def error_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "streamcl.learner.checkpoint" and r.levelno == logging.ERROR
    ]


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    """The first 80 digits training images as task-0 samples, in a fixed order."""
    data = load_digits()
    return [
        Sample(data.train_x[i], int(data.train_y[i]), 0, i, i, Origin("digits", 0, i))
        for i in range(80)
    ]


# --- CheckpointStore -------------------------------------------------------------------


def test_keeps_the_newest_and_loads_the_last(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    written = [store.save(small_state(i)) for i in range(3)]
    assert [p.name for p in written] == [numbered(1), numbered(2), numbered(3)]
    assert sorted(os.listdir(tmp_path)) == [numbered(2), numbered(3)]
    assert store.paths() == [tmp_path / numbered(2), tmp_path / numbered(3)]
    restored = store.load_latest()
    assert restored is not None
    assert restored.path == tmp_path / numbered(3)
    assert_state_equal(restored.state, small_state(2))


def test_sequence_continues_after_rotation_and_ignores_foreign_names(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=1)
    (tmp_path / "checkpoint-latest.pt").write_bytes(b"not ours")
    (tmp_path / "notes.txt").write_text("left alone")
    for i in range(4):
        store.save(small_state(i))
    assert store.paths() == [tmp_path / numbered(4)]
    assert sorted(os.listdir(tmp_path)) == [numbered(4), "checkpoint-latest.pt", "notes.txt"]


def test_keep_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep must be >= 1, got 0"):
        CheckpointStore(tmp_path, keep=0)


def test_empty_or_new_directory_has_nothing_to_load(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path).load_latest() is None
    fresh = tmp_path / "not" / "yet"
    assert CheckpointStore(fresh).load_latest() is None
    assert fresh.is_dir()


def test_learner_and_session_resume_exactly_from_a_checkpoint(
    tmp_path: Path, samples: list[Sample]
) -> None:
    learner = build_learner(CONFIG, SPEC)
    session = LearningSession(learner, None, batch_size=10)
    for sample in samples[:35]:
        session.offer(sample)
    assert learner.updates == 3  # three batches learned, five samples pending
    store = CheckpointStore(tmp_path)
    store.save(
        {
            "learner": learner.state_dict(),
            "session": session.state_dict(),
            "offsets": [["digits", 0, 34]],
            "learner_config": CONFIG.model_dump_json(),
        }
    )

    restored = store.load_latest()  # weights_only=True inside
    assert restored is not None
    assert_state_equal(restored.state["learner"], learner.state_dict())
    assert restored.state["offsets"] == [["digits", 0, 34]]
    assert LearnerConfig.model_validate_json(restored.state["learner_config"]) == CONFIG
    resumed = build_learner(CONFIG.model_copy(update={"seed": 99}), SPEC)  # overwritten below
    resumed_session = LearningSession(resumed, None, batch_size=10)
    resumed.load_state_dict(restored.state["learner"])
    resumed_session.load_state_dict(restored.state["session"])
    assert_state_equal(resumed.state_dict(), learner.state_dict())

    before = [p.detach().clone() for p in learner.model.parameters()]
    for run in (session, resumed_session):
        for sample in samples[35:80]:
            run.offer(sample)
        run.flush()
    assert resumed.updates == learner.updates == 8
    assert_state_equal(resumed.state_dict(), learner.state_dict())
    after = list(learner.model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("damage", ["truncated", "random_bytes", "empty"])
def test_unreadable_newest_falls_back_to_the_previous(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(small_state(1))
    newest = store.save(small_state(2))
    size = newest.stat().st_size
    if damage == "truncated":
        newest.write_bytes(newest.read_bytes()[: size // 2])
    elif damage == "random_bytes":
        newest.write_bytes(np.random.default_rng(0).bytes(size))
    else:
        newest.write_bytes(b"")

    with caplog.at_level(logging.ERROR, logger="streamcl.learner.checkpoint"):
        restored = store.load_latest()
    assert restored is not None
    assert restored.path == tmp_path / numbered(1)
    assert_state_equal(restored.state, small_state(1))
    records = error_records(caplog)
    assert len(records) == 1
    assert str(newest) in records[0].getMessage()


def flip_tensor_bytes(path: Path, tensor: torch.Tensor, count: int = 4) -> None:
    """Invert `count` bytes inside `tensor`'s data where the file stores it (bit rot)."""
    raw = bytearray(path.read_bytes())
    data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    at = raw.find(data)
    assert at >= 0 and raw.find(data, at + 1) < 0, "tensor bytes must occur once in the file"
    for i in range(at + 8, at + 8 + count):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_flipped_tensor_bytes_fail_the_checksum_and_the_previous_is_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(small_state(1))
    damaged = store.save(small_state(2))
    flip_tensor_bytes(damaged, small_state(2)["w"])
    # torch's loader checks no content: the damage loads silently without our checksum.
    tampered = torch.load(damaged, weights_only=True)["state"]["w"]
    assert not torch.equal(tampered, small_state(2)["w"])

    with caplog.at_level(logging.ERROR, logger="streamcl.learner.checkpoint"):
        restored = store.load_latest()
    assert restored is not None
    assert restored.path == tmp_path / numbered(1)
    assert_state_equal(restored.state, small_state(1))
    assert [(s.path, s.reason) for s in restored.skipped] == [(damaged, "checksum")]
    records = error_records(caplog)
    assert len(records) == 1
    assert "fails its checksum" in records[0].getMessage()
    assert str(damaged) in records[0].getMessage()


def test_a_learner_checkpoint_with_flipped_weights_is_not_resumed(
    tmp_path: Path, samples: list[Sample]
) -> None:
    learner = build_learner(CONFIG, SPEC)
    session = LearningSession(learner, None, batch_size=10)
    for sample in samples[:40]:
        session.offer(sample)
    store = CheckpointStore(tmp_path)
    store.save({"learner": learner.state_dict(), "step": 1})
    for sample in samples[40:80]:
        session.offer(sample)
    newest = store.save({"learner": learner.state_dict(), "step": 2})
    flip_tensor_bytes(newest, next(learner.model.parameters()).detach())
    restored = store.load_latest()
    assert restored is not None and restored.state["step"] == 1
    assert [s.reason for s in restored.skipped] == ["checksum"]


def test_every_tensor_kind_round_trips_through_the_checksum(tmp_path: Path) -> None:
    state = {
        "empty": torch.empty(0, dtype=torch.int64),
        "scalar": torch.tensor(3.5),
        "flags": torch.tensor([True, False]),
        "half": torch.ones(2, 3, dtype=torch.bfloat16),
        "strided": torch.arange(12).reshape(3, 4).t(),
        "nested": [("a", 1, 2.5, None, False), {"k": torch.zeros(1)}],
    }
    store = CheckpointStore(tmp_path)
    store.save(state)
    restored = store.load_latest()
    assert restored is not None and restored.skipped == ()
    assert_state_equal(restored.state, state)
    other = checkpoint.content_digest({**state, "scalar": torch.tensor(3.25)})
    assert other != checkpoint.content_digest(state)


def test_a_plain_torch_file_is_not_taken_for_a_checkpoint(tmp_path: Path) -> None:
    torch.save(small_state(1), tmp_path / numbered(1))
    with pytest.raises(CheckpointError, match="none of 1 checkpoints") as raised:
        CheckpointStore(tmp_path).load_latest()
    assert "is not a streamcl checkpoint" in str(raised.value.__cause__)


def test_pickled_objects_are_refused_and_the_previous_checkpoint_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(small_state(1))
    hostile = tmp_path / numbered(2)
    torch.save({"x": Payload(), "w": torch.ones(2)}, hostile)
    assert store.paths()[-1] == hostile

    with caplog.at_level(logging.ERROR, logger="streamcl.learner.checkpoint"):
        restored = store.load_latest()
    assert UNPICKLED == []
    assert restored is not None
    assert restored.path == tmp_path / numbered(1)
    assert_state_equal(restored.state, small_state(1))
    records = error_records(caplog)
    assert len(records) == 1
    assert str(hostile) in records[0].getMessage()
    # The pickle really does run code when loaded without weights_only: the guard matters.
    torch.load(hostile, weights_only=False)
    assert UNPICKLED == ["ran"]
    UNPICKLED.clear()


def test_only_a_pickled_checkpoint_raises_checkpoint_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.save({"x": Payload()}, tmp_path / numbered(1))
    store = CheckpointStore(tmp_path)
    with (
        caplog.at_level(logging.ERROR, logger="streamcl.learner.checkpoint"),
        pytest.raises(CheckpointError, match=r"none of 1 checkpoints in .+ loads") as raised,
    ):
        store.load_latest()
    assert str(tmp_path) in str(raised.value)
    assert UNPICKLED == []
    assert len(error_records(caplog)) == 1


def test_checkpoint_error_chains_the_last_load_failure(tmp_path: Path) -> None:
    """House style: errors chain their cause, so the reason a checkpoint failed is kept."""
    torch.save({"x": Payload()}, tmp_path / numbered(1))
    with pytest.raises(CheckpointError) as raised:
        CheckpointStore(tmp_path).load_latest()
    assert raised.value.__cause__ is not None
    assert UNPICKLED == []


# --- atomicity -------------------------------------------------------------------------


def test_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=5)
    for i in range(3):
        store.save(small_state(i))
    assert sorted(os.listdir(tmp_path)) == [numbered(1), numbered(2), numbered(3)]


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt("stop")])
def test_a_write_failing_midway_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(small_state(1))
    partial: list[Path] = []

    def half_save(state: Any, f: BinaryIO) -> None:
        f.write(b"PK\x03\x04 half a zip archive")
        f.flush()
        partial.extend(p for p in tmp_path.iterdir() if p.name.startswith("."))
        raise failure

    monkeypatch.setattr(checkpoint.torch, "save", half_save)
    with pytest.raises(type(failure), match=str(failure)):
        store.save(small_state(2))
    monkeypatch.undo()

    assert len(partial) == 1  # the bytes did reach a temp file before the failure
    assert sorted(os.listdir(tmp_path)) == [numbered(1)]
    restored = store.load_latest()
    assert restored is not None
    assert_state_equal(restored.state, small_state(1))
    assert store.save(small_state(3)).name == numbered(2)


# --- snapshots -------------------------------------------------------------------------


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def assert_snapshot_holds(path: Path, model: nn.Module) -> None:
    loaded = load_file(str(path / "model.safetensors"))
    expected = model.state_dict()
    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key


def test_snapshot_layout_meta_and_tensors(tmp_path: Path) -> None:
    model = make_model(0)
    meta = {"updates": 7, "offsets": {"topic/0": 69}, "spec": SPEC.to_dict()}
    path = write_snapshot(tmp_path / "snapshots", model, 7, meta)
    assert path == tmp_path / "snapshots" / "v000000007"
    assert sorted(os.listdir(tmp_path / "snapshots")) == ["v000000007"]  # no staging left
    assert sorted(os.listdir(path)) == ["meta.json", "model.safetensors"]
    assert json.loads((path / "meta.json").read_text()) == {
        "version": 7,
        "updates": 7,
        "offsets": {"topic/0": 69},
        "spec": {"feature_shape": [8, 8], "dtype": "uint8", "num_classes": 10},
    }
    assert_snapshot_holds(path, model)


def test_snapshot_keeps_the_newest_versions(tmp_path: Path) -> None:
    models = [make_model(seed) for seed in range(3)]
    for version, model in zip((100, 200, 300), models, strict=True):
        write_snapshot(tmp_path, model, version, {}, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["v000000200", "v000000300"]
    assert_snapshot_holds(tmp_path / "v000000200", models[1])
    assert_snapshot_holds(tmp_path / "v000000300", models[2])


def test_snapshot_with_a_reused_version_replaces_the_directory(tmp_path: Path) -> None:
    first, second = make_model(0), make_model(1)
    path = write_snapshot(tmp_path, first, 5, {"run": "first"})
    (path / "stale.bin").write_bytes(b"from the old directory")
    assert write_snapshot(tmp_path, second, 5, {"run": "second"}) == path
    assert sorted(os.listdir(tmp_path)) == ["v000000005"]
    assert sorted(os.listdir(path)) == ["meta.json", "model.safetensors"]
    assert json.loads((path / "meta.json").read_text()) == {"version": 5, "run": "second"}
    assert_snapshot_holds(path, second)


def test_a_failed_snapshot_leaves_the_previous_one_and_no_staging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = make_model(0)
    write_snapshot(tmp_path, good, 1, {})

    def broken_save(tensors: dict[str, torch.Tensor], filename: str) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_snapshot(tmp_path, make_model(1), 1, {})
    assert sorted(os.listdir(tmp_path)) == ["v000000001"]
    assert_snapshot_holds(tmp_path / "v000000001", good)
