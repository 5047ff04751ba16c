"""Load real labelled data: Fashion-MNIST IDX files, or scikit-learn's bundled digits."""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from streamcl.ingest.errors import DataError

DatasetName = Literal["fashion-mnist", "digits"]
DATA_DIR_ENV = "STREAMCL_DATA"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class LabelledData:
    """A dataset's train and test splits; features `[N, *shape]` uint8, labels `[N]` int64."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int


def load(name: DatasetName, data_dir: str | Path | None = None) -> LabelledData:
    """Load a dataset by name; `data_dir` or $STREAMCL_DATA locate Fashion-MNIST."""
    if name == "fashion-mnist":
        return load_fashion_mnist(find_fashion_mnist(data_dir))
    if name == "digits":
        return load_digits()
    raise DataError(f"unknown dataset {name!r}; expected 'fashion-mnist' or 'digits'")


def find_fashion_mnist(data_dir: str | Path | None = None) -> Path:
    """Return the directory holding the four Fashion-MNIST IDX files.

    A directory the user named (`data_dir`, else $STREAMCL_DATA) must hold them: one
    that does not is an error, never a reason to read data from somewhere else. Only
    when neither is given is Debian's package location used.
    """
    from_env = os.environ.get(DATA_DIR_ENV)
    if data_dir:
        directory, named_by = Path(data_dir), "--data-dir"
    elif from_env:
        directory, named_by = Path(from_env), f"${DATA_DIR_ENV}"
    else:
        directory, named_by = DEBIAN_FASHION_MNIST, ""
    missing = [stem for stem in _FASHION_FILES.values() if _idx_path(directory, stem) is None]
    if not missing:
        return directory
    files = ", ".join(_FASHION_FILES.values())
    if named_by:
        problem = (
            "does not exist"
            if not directory.exists()
            else "is not a directory"
            if not directory.is_dir()
            else f"lacks {', '.join(missing)}"
        )
        raise DataError(
            f"{named_by} {directory} {problem}: it must hold the Fashion-MNIST IDX files "
            f"{files} (optionally .gz)"
        )
    raise DataError(
        f"Fashion-MNIST IDX files not found (looked in {directory}). Either install Debian's "
        f"package (apt-get install dataset-fashion-mnist) or pass --data-dir / set "
        f"${DATA_DIR_ENV} to a directory with {files} (optionally .gz); or use "
        f"--dataset digits, which needs no download."
    )


def load_fashion_mnist(directory: str | Path) -> LabelledData:
    """Read Fashion-MNIST from IDX files (plain or gzipped) in `directory`."""
    directory = Path(directory)
    arrays = {}
    for key, stem in _FASHION_FILES.items():
        path = _idx_path(directory, stem)
        if path is None:
            raise DataError(f"{directory} has no {stem} (or {stem}.gz)")
        arrays[key] = read_idx(path)
    return LabelledData(
        name="fashion-mnist",
        train_x=arrays["train_x"],
        train_y=arrays["train_y"].astype(np.int64),
        test_x=arrays["test_x"],
        test_y=arrays["test_y"].astype(np.int64),
        num_classes=10,
    )


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> LabelledData:
    """scikit-learn's bundled 8x8 digits (1,797 images), scaled to uint8 0..255."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = round(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return LabelledData("digits", images[train], labels[train], images[test], labels[test], 10)


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (the MNIST container format) into a uint8 array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read IDX file {path}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    start = 4 + 4 * ndim
    if len(raw) - start != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims}, file holds {len(raw) - start} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims)


def _idx_path(directory: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (directory / name).is_file():
            return directory / name
    return None
