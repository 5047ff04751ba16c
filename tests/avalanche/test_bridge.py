"""The Avalanche bridge against the real avalanche-lib 0.6 (runs in the 'avalanche' venv).

tests/run.sh runs this directory with the extra's own venv; the core venv has no
avalanche and skips it (STREAMCL_REQUIRE_AVALANCHE=1 makes a missing library a failure).
SplitFMNIST runs on real Fashion-MNIST cut to its first 3,000 training and 600 test
images (the IDX files rewritten with smaller counts) so the test takes seconds.
"""

from __future__ import annotations

import gzip
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from streamcl.deploy.cli.main import cli
from streamcl.ingest.datasets import find_fashion_mnist
from tests.data import require_fashion_mnist

if os.environ.get("STREAMCL_REQUIRE_AVALANCHE") != "1":
    pytest.importorskip("avalanche")
warnings.filterwarnings("ignore", module="avalanche|torchvision|qpsolvers")

TRAIN, TEST = 3000, 600


def _cut_idx(source: Path, target: Path, count: int) -> None:
    """Rewrite an IDX file keeping its first `count` items (torchvision reads raw IDX)."""
    raw = gzip.decompress(source.read_bytes()) if source.suffix == ".gz" else source.read_bytes()
    ndim = raw[3]
    dims = list(struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim]))
    item = int(np.prod(dims[1:])) if ndim > 1 else 1
    head = raw[:4] + struct.pack(f">{ndim}I", count, *dims[1:])
    start = 4 + 4 * ndim
    target.write_bytes(head + raw[start : start + count * item])


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_fashion_mnist()
    source = find_fashion_mnist()
    root = tmp_path_factory.mktemp("fmnist")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem, count in (
        ("train-images-idx3-ubyte", TRAIN),
        ("train-labels-idx1-ubyte", TRAIN),
        ("t10k-images-idx3-ubyte", TEST),
        ("t10k-labels-idx1-ubyte", TEST),
    ):
        found = next(p for p in source.iterdir() if p.name.startswith(stem))
        _cut_idx(found, raw / stem, count)
    return root


def _samples(stream) -> list[tuple[int, np.ndarray, int]]:  # type: ignore[no-untyped-def]
    from streamcl.ingest.avalanche import as_array

    return [
        (e, as_array(item[0]), int(item[1]))
        for e, experience in enumerate(stream)
        for item in experience.dataset
    ]


def test_split_fmnist_round_trip_gives_avalanche_the_same_samples(
    fmnist_root: Path, tmp_path: Path
) -> None:
    from avalanche.benchmarks.classic import SplitFMNIST

    from streamcl.ingest.avalanche import load_benchmark

    args = f"n_experiences=5,seed=3,dataset_root={fmnist_root}"
    stream, exported = tmp_path / "split.scs", tmp_path / "split.npz"
    runner = CliRunner()
    command = ["stream", "import", "avalanche:SplitFMNIST", "--benchmark-args", args]
    result = runner.invoke(cli, [*command, "--out", str(stream)])
    assert result.exit_code == 0, result.output
    assert f"wrote {TRAIN} messages" in result.output and f"{TEST} samples" in result.output
    result = runner.invoke(cli, ["stream", "export", str(stream), "--out", str(exported)])
    assert result.exit_code == 0, result.output
    assert "in 5 experiences" in result.output

    original = SplitFMNIST(5, seed=3, dataset_root=fmnist_root)
    back = load_benchmark(exported)
    for name in ("train_stream", "test_stream"):
        want, got = _samples(getattr(original, name)), _samples(getattr(back, name))
        assert len(want) == len(got) == (TRAIN if name == "train_stream" else TEST)
        for (we, wx, wy), (ge, gx, gy) in zip(want, got, strict=True):
            assert (we, wy) == (ge, gy)
            np.testing.assert_array_equal(wx, gx)


def test_online_experiences_flag_the_last_and_keep_the_experience_id(fmnist_root: Path) -> None:
    from avalanche.benchmarks.classic import SplitFMNIST
    from avalanche.benchmarks.scenarios.online import split_online_stream

    from streamcl.ingest.avalanche import online_experiences

    benchmark = SplitFMNIST(5, seed=0, dataset_root=fmnist_root)
    experience = benchmark.train_stream[2]
    length = len(experience.dataset)
    size = next(s for s in range(10, length + 1) if length % s == 0)
    minis = list(online_experiences(experience, size))
    assert [m.is_last_subexp for m in minis].count(True) == 1 and minis[-1].is_last_subexp
    assert {m.current_experience for m in minis} == {2}
    assert sum(len(m.dataset) for m in minis) == length
    # The fault this works around: Avalanche's own splitter with a length that divides evenly.
    theirs = list(split_online_stream([experience], experience_size=size, shuffle=False))
    assert not any(m.is_last_subexp for m in theirs)


def test_missing_benchmark_is_one_clear_error() -> None:
    from streamcl.ingest.avalanche import resolve
    from streamcl.ingest.errors import StreamclError

    with pytest.raises(StreamclError, match="cannot find benchmark 'avalanche:NoSuch'"):
        resolve("avalanche:NoSuch", {})
    with pytest.raises(StreamclError, match="benchmark source must be"):
        resolve("nonsense", {})
