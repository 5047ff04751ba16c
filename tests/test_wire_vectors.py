"""streamcl's codec against the wire-format test vectors (tests/vectors/wire-v1.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamcl.ingest.codec import REJECT_REASONS, decode
from streamcl.ingest.schema import NO_TASK, Rejected, Sample, StreamSpec
from tests.vectors.make_wire_vectors import OUT, render

VECTORS: list[dict[str, Any]] = json.loads(Path(OUT).read_text())["vectors"]


def test_the_vectors_file_is_what_its_generator_writes() -> None:
    assert OUT.read_text() == render(), "run: python -m tests.vectors.make_wire_vectors"


def test_the_vectors_cover_valid_messages_and_most_reject_reasons() -> None:
    rejects = {v["reject"] for v in VECTORS if "reject" in v}
    assert sum("sample" in v for v in VECTORS) >= 5
    assert set(REJECT_REASONS) - rejects == {"tombstone", "bad_task"}  # not binary/hex-able


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_the_codec_decodes_every_vector_as_expected(vector: dict[str, Any]) -> None:
    raw = vector["spec"]
    spec = StreamSpec(tuple(raw["feature_shape"]), raw["dtype"], raw["num_classes"])
    got = decode(bytes.fromhex(vector["hex"]), spec)
    if "reject" in vector:
        assert isinstance(got, Rejected), f"{vector['name']}: decoded, expected a reject"
        assert got.reason == vector["reject"], got.detail
        return
    assert isinstance(got, Sample), f"{vector['name']}: rejected: {got}"
    want = vector["sample"]
    assert got.features.shape == spec.feature_shape and got.features.dtype == spec.dtype
    np.testing.assert_array_equal(
        got.features.ravel(), np.array(want["features"], dtype=spec.dtype)
    )
    task = NO_TASK if want["task"] is None else want["task"]
    assert (got.label, got.task, got.sample_id, got.event_time_ms) == (
        want["label"],
        task,
        want["sample_id"],
        want["event_time_ms"],
    )
