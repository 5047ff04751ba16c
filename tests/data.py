"""Real-data guards and stream reading shared by the acceptance tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from streamcl.ingest.codec import decode
from streamcl.ingest.datasets import find_fashion_mnist
from streamcl.ingest.errors import DataError
from streamcl.ingest.recorded import StreamReader
from streamcl.ingest.schema import Sample, StreamSpec


def samples(stream: Path) -> tuple[StreamSpec, list[Sample]]:
    """A recorded stream's spec and its decodable samples, in order."""
    with StreamReader(stream) as reader:
        decoded = [decode(item.payload, reader.spec) for item in reader]
        return reader.spec, [s for s in decoded if isinstance(s, Sample)]


def require_fashion_mnist() -> None:
    """Skip without Fashion-MNIST, unless STREAMCL_REQUIRE_DATA=1 (CI) makes that a failure."""
    try:
        find_fashion_mnist()
    except DataError as err:
        if os.environ.get("STREAMCL_REQUIRE_DATA") == "1":
            raise
        pytest.skip(f"Fashion-MNIST not installed: {err}")
