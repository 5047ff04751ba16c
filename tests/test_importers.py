"""`stream import` from .npz and `stream export` back: good files, every bad-input case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from streamcl.deploy.cli.main import cli
from streamcl.ingest import heldout as heldout_io
from streamcl.ingest.codec import decode
from streamcl.ingest.errors import DataError
from streamcl.ingest.exporters import experience_ids, export_npz
from streamcl.ingest.importers import from_npz
from streamcl.ingest.recorded import StreamReader
from streamcl.ingest.schema import NO_TASK, Sample


def arrays(n: int = 40, m: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "features": rng.integers(0, 256, (n, 4, 3), dtype=np.uint8),
        "labels": rng.integers(0, 4, n),
        "tasks": np.repeat(np.arange(2), n // 2),
        "noisy": rng.random(n) < 0.3,
        "eval_features": rng.integers(0, 256, (m, 4, 3), dtype=np.uint8),
        "eval_labels": rng.integers(0, 4, m),
        "eval_tasks": rng.integers(0, 2, m),
    }


def save(tmp_path: Path, **items: np.ndarray) -> Path:
    path = tmp_path / "in.npz"
    np.savez(path, **items)  # type: ignore[arg-type]
    return path


def read_stream(path: Path) -> list[Sample]:
    with StreamReader(path) as reader:
        decoded = [decode(frame.payload, reader.spec) for frame in reader]  # type: ignore[union-attr]
    assert all(isinstance(s, Sample) for s in decoded)
    return decoded  # type: ignore[return-value]


def test_import_keeps_order_tasks_heldout_and_noise_flags(tmp_path: Path) -> None:
    src = arrays()
    out = tmp_path / "s.scs"
    result = CliRunner().invoke(
        cli, ["stream", "import", str(save(tmp_path, **src)), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "wrote 40 messages" in result.output
    samples = read_stream(out)
    np.testing.assert_array_equal(np.stack([s.features for s in samples]), src["features"])
    assert [s.label for s in samples] == src["labels"].tolist()
    assert [s.task for s in samples] == src["tasks"].tolist()
    assert [s.sample_id for s in samples] == list(range(40))
    held = heldout_io.load(heldout_io.sidecar_path(out))
    np.testing.assert_array_equal(held.features, src["eval_features"])
    np.testing.assert_array_equal(held.groups, src["eval_tasks"])
    assert held.group_kind == "task"
    np.testing.assert_array_equal(held.train_corrupted, src["noisy"])


def test_float_features_without_tasks_or_heldout(tmp_path: Path) -> None:
    feats = np.linspace(-1, 1, 30 * 5, dtype=np.float64).reshape(30, 5)
    out = tmp_path / "s.scs"
    stale = heldout_io.sidecar_path(out)
    stale.write_bytes(b"old")
    built = from_npz(save(tmp_path, features=feats, labels=np.arange(30) % 3))
    assert built.spec.dtype == "float32" and built.spec.num_classes == 3
    from streamcl.ingest.importers import write

    assert write(built, out) is None
    assert not stale.exists()
    samples = read_stream(out)
    assert {s.task for s in samples} == {NO_TASK}
    np.testing.assert_allclose(np.stack([s.features for s in samples]), feats.astype(np.float32))


def test_heldout_without_eval_tasks_is_grouped_by_class(tmp_path: Path) -> None:
    src = arrays()
    del src["eval_tasks"]
    built = from_npz(save(tmp_path, **src))
    assert built.heldout.group_kind == "class"
    np.testing.assert_array_equal(built.heldout.groups, src["eval_labels"])


def _nan_features() -> dict[str, np.ndarray]:
    src = arrays()
    feats = src["features"].astype(np.float32)
    feats[7, 1, 2] = np.nan
    return {**src, "features": feats}


def _with(**changes: object) -> dict[str, np.ndarray]:
    src = arrays()
    for name, value in changes.items():
        if value is None:
            del src[name]
        else:
            src[name] = value  # type: ignore[assignment]
    return src


BAD = {
    "missing features": (_with(features=None), "missing array(s) features"),
    "missing labels": (_with(labels=None), "missing array(s) labels"),
    "unknown array": (_with(label=np.zeros(40)), "unknown array(s) label"),
    "short labels": (_with(labels=np.zeros(39, np.int64)), "labels has 39 rows, features has 40"),
    "short tasks": (_with(tasks=np.zeros(41, np.int64)), "tasks has 41 rows, features has 40"),
    "short noisy": (_with(noisy=np.zeros(3, bool)), "noisy has 3 rows"),
    "2-d labels": (_with(labels=np.zeros((40, 1), np.int64)), "labels must be one-dimensional"),
    "1-d features": (_with(features=np.zeros(40)), "features must be [N, ...]"),
    "string features": (_with(features=np.array([["a"]] * 40)), "features must hold numbers"),
    "nan feature": (_nan_features(), "features[7] is not finite"),
    "inf eval feature": (
        _with(
            eval_features=np.where(np.arange(12)[:, None, None] == 5, np.inf, 1.0)
            * np.ones((12, 4, 3))
        ),
        "eval_features[5] is not finite",
    ),
    "negative label": (
        _with(labels=np.r_[np.zeros(10), -1, np.zeros(29)].astype(int)),
        "labels[10] = -1 is outside [0, 3]",
    ),
    "fractional label": (
        _with(labels=np.r_[np.zeros(3), 1.5, np.zeros(36)]),
        "labels[3] = 1.5 is not an integer",
    ),
    "eval label out of range": (
        _with(eval_labels=np.r_[np.zeros(11), -1].astype(int)),
        "eval_labels[11] = -1 is outside [0, 3]",
    ),
    "negative task": (
        _with(tasks=np.r_[np.zeros(39), -2].astype(int)),
        "tasks[39] = -2 is outside",
    ),
    "noisy not a flag": (
        _with(noisy=np.r_[np.zeros(4), 2, np.zeros(35)].astype(int)),
        "noisy[4] = 2 is not a 0/1 flag",
    ),
    "eval shape": (
        _with(eval_features=np.zeros((12, 12), np.uint8)),
        "eval_features samples have shape (12,)",
    ),
    "eval labels missing": (_with(eval_labels=None), "eval_labels missing"),
    "eval features missing": (_with(eval_features=None), "eval_features missing"),
    "eval tasks length": (
        _with(eval_tasks=np.zeros(11, np.int64)),
        "eval_tasks has 11 rows, eval_features has 12",
    ),
    "noisy without heldout": (
        _with(eval_features=None, eval_labels=None, eval_tasks=None),
        "noisy/clean_labels travel in the held-out file",
    ),
    "no samples": (
        _with(features=np.zeros((0, 3)), labels=np.zeros(0, np.int64), tasks=None, noisy=None),
        "holds no samples",
    ),
    "too many dims": (
        _with(features=np.zeros((40, 1, 1, 1, 1, 2)), eval_features=np.zeros((12, 1, 1, 1, 1, 2))),
        "feature_shape has at most 4 dims",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_the_array_and_index(tmp_path: Path, case: str) -> None:
    items, message = BAD[case]
    with pytest.raises(DataError) as caught:
        from_npz(save(tmp_path, **items))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    path = save(tmp_path, **_nan_features())
    out = tmp_path / "s.scs"
    proc = _run_cli(["stream", "import", str(path), "--out", str(out)])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "features[7] is not finite" in proc.stderr
    assert not out.exists()


def test_declared_classes_bound_labels(tmp_path: Path) -> None:
    path = save(tmp_path, **arrays())
    with pytest.raises(DataError, match=r"is outside \[0, 2\] \(the declared classes\)"):
        from_npz(path, num_classes=3)
    src = _with(eval_labels=np.r_[np.zeros(11), 3].astype(int), labels=np.zeros(40, np.int64))
    with pytest.raises(DataError, match=r"eval_labels\[11\] = 3 is outside \[0, 2\]"):
        from_npz(save(tmp_path, **src), num_classes=3)


def test_pickled_and_unreadable_files_are_refused(tmp_path: Path) -> None:
    pickled = tmp_path / "obj.npz"
    np.savez(pickled, features=np.array([{"a": 1}] * 3, dtype=object), labels=np.zeros(3))
    with pytest.raises(DataError, match="array 'features' cannot be read"):
        from_npz(pickled)
    garbage = tmp_path / "junk.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"cannot read .*junk\.npz as an \.npz file"):
        from_npz(garbage)


def test_export_then_import_gives_the_same_stream(tmp_path: Path) -> None:
    src = arrays()
    first, second = tmp_path / "a.scs", tmp_path / "b.scs"
    runner = CliRunner()
    assert (
        runner.invoke(
            cli, ["stream", "import", str(save(tmp_path, **src)), "--out", str(first)]
        ).exit_code
        == 0
    )
    exported = tmp_path / "out.npz"
    result = runner.invoke(cli, ["stream", "export", str(first), "--out", str(exported)])
    assert result.exit_code == 0, result.output
    assert "wrote 40 samples in 2 experiences" in result.output
    with np.load(exported) as npz:
        np.testing.assert_array_equal(npz["experiences"], src["tasks"])
        np.testing.assert_array_equal(npz["noisy"], src["noisy"])
    result = runner.invoke(cli, ["stream", "import", str(exported), "--out", str(second)])
    assert result.exit_code == 0, result.output
    assert _same(first, second)
    np.testing.assert_array_equal(
        heldout_io.load(heldout_io.sidecar_path(first)).features,
        heldout_io.load(heldout_io.sidecar_path(second)).features,
    )


def _same(a: Path, b: Path) -> bool:
    left, right = read_stream(a), read_stream(b)
    return len(left) == len(right) and all(
        np.array_equal(x.features, y.features) and (x.label, x.task) == (y.label, y.task)
        for x, y in zip(left, right, strict=True)
    )


def test_export_counts_what_it_skips_and_windows_task_free_streams(tmp_path: Path) -> None:
    from streamcl.ingest.codec import encode
    from streamcl.ingest.recorded import StreamWriter
    from streamcl.ingest.schema import StreamSpec

    spec = StreamSpec((3,), "float32", 2)
    path = tmp_path / "rec.scs"
    with StreamWriter(path, spec) as writer:
        for i in range(25):
            writer.write(encode(Sample(np.full(3, i, np.float32), i % 2, sample_id=i)), i, i)
        writer.write(b"junk", 25, 25)
    with pytest.raises(Exception, match="without task ids: give a window size"):
        export_npz(path, tmp_path / "x.npz")
    done = export_npz(path, tmp_path / "x.npz", window=10)
    assert (done.samples, done.experiences, dict(done.skipped)) == (25, 3, {"garbage": 1})
    assert not done.heldout
    with np.load(tmp_path / "x.npz") as npz:
        assert "tasks" not in npz.files
        assert npz["experiences"].tolist() == [0] * 10 + [1] * 10 + [2] * 5


def test_experiences_follow_task_runs() -> None:
    assert experience_ids(np.array([3, 3, 1, 1, 1, 3]), None).tolist() == [0, 0, 1, 1, 1, 2]


def _run_cli(args: list[str]):  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "streamcl.deploy.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_avalanche_source_without_the_extra_says_how_to_install_it(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("avalanche") is not None:
        pytest.skip("avalanche is installed here; tests/avalanche covers this source")
    proc = _run_cli(["stream", "import", "avalanche:SplitFMNIST", "--out", str(tmp_path / "s")])
    assert proc.returncode == 2
    assert "pip install 'streamcl[avalanche]'" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_import_and_export_explain_themselves_with_env_twins() -> None:
    for command, twin in (
        ("import", "STREAMCL_STREAM_IMPORT_OUT"),
        ("export", "STREAMCL_STREAM_EXPORT_WINDOW"),
    ):
        result = CliRunner().invoke(cli, ["stream", command, "--help"])
        assert result.exit_code == 0 and twin in result.output, result.output


def test_a_source_that_is_neither_npz_nor_a_benchmark_is_named(tmp_path: Path) -> None:
    from streamcl.ingest.avalanche import resolve
    from streamcl.ingest.errors import ConfigError

    with pytest.raises(ConfigError, match=r"must be a \.npz file, 'avalanche:NAME' or"):
        resolve(str(tmp_path / "data.csv"), {})
