"""Real-data guards shared by the acceptance tests."""

from __future__ import annotations

import os

import pytest

from streamcl.ingest.datasets import find_fashion_mnist
from streamcl.ingest.errors import DataError


def require_fashion_mnist() -> None:
    """Skip without Fashion-MNIST, unless STREAMCL_REQUIRE_DATA=1 (CI) makes that a failure."""
    try:
        find_fashion_mnist()
    except DataError as err:
        if os.environ.get("STREAMCL_REQUIRE_DATA") == "1":
            raise
        pytest.skip(f"Fashion-MNIST not installed: {err}")
