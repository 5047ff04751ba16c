"""Dataset loading: IDX parsing on hand-written files, Fashion-MNIST discovery, digits."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from streamcl.ingest import datasets
from streamcl.ingest.datasets import (
    find_fashion_mnist,
    load,
    load_digits,
    load_fashion_mnist,
    read_idx,
)
from streamcl.ingest.errors import DataError

STEMS = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX container by hand: 0, 0, type 0x08 (ubyte), ndim, big-endian u32 dims, data."""
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return bytes([0, 0, 0x08, array.ndim]) + dims + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def fake_fashion(directory: Path, gz: bool = False, skip: str | None = None) -> Path:
    """Tiny IDX files with the Fashion-MNIST names: 5 train and 3 test images of 4x4."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_x": np.arange(5 * 16).reshape(5, 4, 4),
        "train_y": np.array([0, 9, 3, 3, 1]),
        "test_x": 255 - np.arange(3 * 16).reshape(3, 4, 4),
        "test_y": np.array([2, 7, 9]),
    }
    for key, stem in STEMS.items():
        if stem != skip:
            write_idx(directory / (stem + (".gz" if gz else "")), arrays[key])
    return directory


@pytest.fixture
def no_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No $STREAMCL_DATA and a Debian location that holds nothing."""
    monkeypatch.delenv("STREAMCL_DATA", raising=False)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")


# --- read_idx -------------------------------------------------------------------------------


def test_idx_header_is_what_we_think() -> None:
    raw = idx_bytes(np.array([[1, 2, 3], [4, 5, 6]]))
    assert raw == bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6])


@pytest.mark.parametrize("name", ["images.idx", "images.idx.gz"])
def test_read_idx_3d(tmp_path: Path, name: str) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    got = read_idx(write_idx(tmp_path / name, array))
    assert got.dtype == np.uint8
    assert got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize("name", ["labels.idx", "labels.idx.gz"])
def test_read_idx_1d(tmp_path: Path, name: str) -> None:
    got = read_idx(write_idx(tmp_path / name, np.array([9, 0, 255, 7])))
    np.testing.assert_array_equal(got, [9, 0, 255, 7])
    assert got.shape == (4,)


def test_read_idx_large_dimension_uses_all_four_bytes(tmp_path: Path) -> None:
    array = np.arange(300 * 2, dtype=np.int64).reshape(300, 2) % 256
    got = read_idx(write_idx(tmp_path / "wide", array))
    assert got.shape == (300, 2)
    np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\x00",
        b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd",
        b"\x01\x00\x08\x01\x00\x00\x00\x01a",
    ],
    ids=["empty", "short", "float-type", "bad-magic"],
)
def test_read_idx_rejects_what_is_not_ubyte_idx(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "thing"
    path.write_bytes(raw)
    with pytest.raises(DataError, match="thing is not an unsigned-byte IDX file"):
        read_idx(path)


@pytest.mark.parametrize("delta", [-1, 1])
def test_read_idx_size_mismatch(tmp_path: Path, delta: int) -> None:
    raw = idx_bytes(np.zeros((2, 3)))
    path = tmp_path / "sized"
    path.write_bytes(raw[:-1] if delta < 0 else raw + b"\x00")
    with pytest.raises(DataError, match=rf"header says \[2, 3\], file holds {6 + delta} bytes"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cannot read IDX file .*absent") as info:
        read_idx(tmp_path / "absent")
    assert isinstance(info.value.__cause__, OSError)


def test_read_idx_gz_that_is_not_gzip(tmp_path: Path) -> None:
    path = tmp_path / "plain.gz"
    path.write_bytes(idx_bytes(np.zeros(3)))
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(path)


def test_read_idx_truncated_gz_is_a_data_error(tmp_path: Path) -> None:
    # A half-downloaded archive: gzip raises EOFError, which is not an OSError.
    compressed = gzip.compress(idx_bytes(np.arange(4000).reshape(40, 100) % 256), mtime=0)
    path = tmp_path / "half.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(DataError, match=r"half\.gz"):
        read_idx(path)


@pytest.mark.parametrize("at", [12, 25], ids=["deflate-stream", "crc"])
def test_read_idx_corrupt_gz_is_a_data_error(tmp_path: Path, at: int) -> None:
    # A flipped byte in the deflate stream surfaces as zlib.error (not an OSError); one
    # that survives inflation fails gzip's CRC check (BadGzipFile, an OSError).
    array = np.arange(4000).reshape(40, 100) % 256
    compressed = bytearray(gzip.compress(idx_bytes(array), mtime=0))
    compressed[at] ^= 0xFF
    path = tmp_path / "damaged.gz"
    path.write_bytes(bytes(compressed))
    with pytest.raises(DataError, match=r"damaged\.gz"):
        read_idx(path)


# --- finding Fashion-MNIST --------------------------------------------------------------------


@pytest.mark.usefixtures("no_defaults")
@pytest.mark.parametrize("gz", [False, True])
def test_find_in_data_dir(tmp_path: Path, gz: bool) -> None:
    directory = fake_fashion(tmp_path / "fm", gz=gz)
    assert find_fashion_mnist(directory) == directory
    assert find_fashion_mnist(str(directory)) == directory


@pytest.mark.usefixtures("no_defaults")
def test_find_via_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = fake_fashion(tmp_path / "from-env")
    monkeypatch.setenv("STREAMCL_DATA", str(directory))
    assert find_fashion_mnist() == directory


@pytest.mark.usefixtures("no_defaults")
def test_data_dir_wins_over_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = fake_fashion(tmp_path / "explicit")
    monkeypatch.setenv("STREAMCL_DATA", str(fake_fashion(tmp_path / "from-env")))
    assert find_fashion_mnist(explicit) == explicit


@pytest.mark.usefixtures("no_defaults")
def test_a_named_directory_without_the_files_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to fall through to $STREAMCL_DATA or Debian's copy: silently other data."""
    partial = fake_fashion(tmp_path / "partial", skip=STEMS["test_y"])
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("STREAMCL_DATA", str(fake_fashion(tmp_path / "complete", gz=True)))
    with pytest.raises(DataError, match=f"--data-dir {partial} lacks {STEMS['test_y']}:"):
        find_fashion_mnist(partial)
    with pytest.raises(DataError, match=f"--data-dir {empty} lacks {STEMS['train_x']}, "):
        find_fashion_mnist(empty)
    monkeypatch.setenv("STREAMCL_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"\$STREAMCL_DATA .*nowhere does not exist"):
        find_fashion_mnist()


def test_debian_location_is_used_only_when_no_directory_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STREAMCL_DATA", raising=False)
    debian = fake_fashion(tmp_path / "usr-share", gz=True)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", debian)
    assert find_fashion_mnist() == debian
    with pytest.raises(DataError, match="empty does not exist"):
        find_fashion_mnist(tmp_path / "empty")


def test_debian_default_path_is_the_package_location() -> None:
    assert Path("/usr/share/datasets/fashion-mnist") == datasets.DEBIAN_FASHION_MNIST


@pytest.mark.usefixtures("no_defaults")
def test_not_found_names_every_way_to_fix_it() -> None:
    with pytest.raises(DataError) as info:
        find_fashion_mnist()
    message = str(info.value)
    assert "Fashion-MNIST IDX files not found" in message
    assert "no-debian-package" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message
    assert "$STREAMCL_DATA" in message
    assert "train-images-idx3-ubyte" in message
    assert "--dataset digits" in message


@pytest.mark.usefixtures("no_defaults")
def test_load_fashion_mnist_from_fake_files(tmp_path: Path) -> None:
    data = load("fashion-mnist", data_dir=fake_fashion(tmp_path / "fm", gz=True))
    assert data.name == "fashion-mnist"
    assert data.num_classes == 10
    assert data.train_x.shape == (5, 4, 4)
    assert data.test_x.shape == (3, 4, 4)
    assert data.train_x.dtype == np.uint8
    assert data.train_y.dtype == data.test_y.dtype == np.int64
    np.testing.assert_array_equal(data.train_y, [0, 9, 3, 3, 1])
    np.testing.assert_array_equal(data.test_y, [2, 7, 9])
    np.testing.assert_array_equal(data.train_x[1], np.arange(16, 32).reshape(4, 4))


def test_load_fashion_mnist_missing_file(tmp_path: Path) -> None:
    directory = fake_fashion(tmp_path / "fm", skip=STEMS["test_x"])
    with pytest.raises(DataError, match=r"has no t10k-images-idx3-ubyte \(or t10k-images"):
        load_fashion_mnist(directory)


def test_load_unknown_dataset() -> None:
    with pytest.raises(DataError, match="unknown dataset 'mnist'; expected 'fashion-mnist' or"):
        load("mnist")  # type: ignore[arg-type]


@pytest.mark.skipif(
    not datasets.DEBIAN_FASHION_MNIST.is_dir(), reason="Debian dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist_from_the_debian_package() -> None:
    data = load_fashion_mnist(datasets.DEBIAN_FASHION_MNIST)
    assert data.train_x.shape == (60000, 28, 28)
    assert data.test_x.shape == (10000, 28, 28)
    assert data.train_y.shape == (60000,)
    assert data.test_y.shape == (10000,)
    np.testing.assert_array_equal(np.bincount(data.train_y), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(data.test_y), [1000] * 10)
    assert data.train_x.dtype == np.uint8


# --- digits -----------------------------------------------------------------------------------


def test_digits_split_and_scaling() -> None:
    data = load("digits")
    assert data.name == "digits"
    assert data.num_classes == 10
    assert data.train_x.shape == (1348, 8, 8)
    assert data.test_x.shape == (449, 8, 8)  # round(1797 * 0.25)
    assert data.train_x.dtype == np.uint8
    assert data.train_y.dtype == np.int64
    # sklearn's 0..16 intensities scaled to 0..255: 16 -> 255, 8 -> round(127.5) = 128.
    values = set(np.unique(np.concatenate([data.train_x.ravel(), data.test_x.ravel()])).tolist())
    assert {0, 255} <= values
    assert values <= {round(v * 255 / 16) for v in range(17)}
    assert set(np.unique(data.train_y).tolist()) == set(range(10))


def test_digits_split_is_a_seeded_partition() -> None:
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    np.testing.assert_array_equal(a.test_y, b.test_y)
    assert not np.array_equal(a.test_x, c.test_x)
    for data in (a, c):
        every = np.concatenate([data.train_x, data.test_x]).reshape(1797, -1)
        labels = np.concatenate([data.train_y, data.test_y])
        order = np.lexsort(every.T)
        reference = np.concatenate([a.train_x, a.test_x]).reshape(1797, -1)
        ref_labels = np.concatenate([a.train_y, a.test_y])
        ref_order = np.lexsort(reference.T)
        np.testing.assert_array_equal(every[order], reference[ref_order])
        assert sorted(labels.tolist()) == sorted(ref_labels.tolist())


@pytest.mark.parametrize(("fraction", "n_test"), [(0.1, 180), (0.5, 898)])
def test_digits_test_fraction(fraction: float, n_test: int) -> None:
    data = load_digits(test_fraction=fraction)
    assert len(data.test_y) == n_test
    assert len(data.train_y) == 1797 - n_test
