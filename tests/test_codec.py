"""The wire codec: pinned binary layout, round trips, one crafted payload per reject reason."""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from streamcl.ingest.codec import REJECT_REASONS, decode, decode_many, encode, encode_json
from streamcl.ingest.schema import NO_TASK, Batch, Origin, Rejected, Sample, StreamSpec

U8 = StreamSpec((2, 3), "uint8", 10)
F32 = StreamSpec((4,), "float32", 5)
HEADER_SIZE = 28  # "SC" + 4 x u8 + u16 + i32 + i64 + i64
ORIGIN = Origin("digits", 3, 41)


def u8_sample(label: int = 7, task: int = NO_TASK) -> Sample:
    features = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40
    return Sample(features, label, task, sample_id=12345, event_time_ms=1_700_000_000_123)


def f32_sample(label: int = 4, task: int = NO_TASK, values: list[float] | None = None) -> Sample:
    values = [0.5, -1.25, 3.0e-7, 1.0e30] if values is None else values
    return Sample(np.array(values, dtype=np.float32), label, task, 9, 77)


def rejected(payload: bytes, spec: StreamSpec) -> Rejected:
    result = decode(payload, spec, ORIGIN)
    assert isinstance(result, Rejected), f"expected a rejection, got {result!r}"
    assert result.reason in REJECT_REASONS
    assert result.payload == payload
    assert result.origin == ORIGIN
    return result


def assert_same_sample(got: Sample | Rejected, want: Sample, origin: Origin | None) -> None:
    assert isinstance(got, Sample), f"expected a sample, got {got!r}"
    assert got.features.dtype == want.features.dtype
    assert got.features.shape == want.features.shape
    np.testing.assert_array_equal(got.features, want.features)
    assert (got.label, got.task, got.sample_id, got.event_time_ms) == (
        want.label,
        want.task,
        want.sample_id,
        want.event_time_ms,
    )
    assert got.origin == origin


# --- binary layout and round trips -------------------------------------------------------


def test_binary_layout_is_pinned_byte_for_byte() -> None:
    sample = Sample(
        np.array([1, 2], dtype=np.uint8), label=3, task=5, sample_id=9, event_time_ms=11
    )
    expected = (
        b"SC"
        + bytes([1, 1, 1, 1])  # version 1, dtype uint8, ndim 1, flags: task present
        + (5).to_bytes(2, "little")
        + (3).to_bytes(4, "little", signed=True)
        + (9).to_bytes(8, "little", signed=True)
        + (11).to_bytes(8, "little", signed=True)
        + (2).to_bytes(4, "little")
        + bytes([1, 2])
    )
    assert encode(sample) == expected


def test_binary_without_task_clears_the_flag_and_the_field() -> None:
    payload = encode(Sample(np.zeros(3, np.float32), label=1))
    assert payload[2:6] == bytes([1, 2, 1, 0])  # version, dtype float32, ndim, no flags
    assert payload[6:8] == b"\x00\x00"
    assert len(payload) == HEADER_SIZE + 4 + 3 * 4


@pytest.mark.parametrize("task", [NO_TASK, 0, 3, 0xFFFF])
def test_binary_round_trip_uint8(task: int) -> None:
    sample = u8_sample(task=task)
    assert_same_sample(decode(encode(sample), U8, ORIGIN), sample, ORIGIN)


@pytest.mark.parametrize("task", [NO_TASK, 2])
def test_binary_round_trip_float32(task: int) -> None:
    sample = f32_sample(task=task)
    assert_same_sample(decode(encode(sample), F32), sample, None)


def test_binary_round_trip_keeps_extreme_header_values() -> None:
    sample = Sample(
        np.full((2, 3), 255, np.uint8), 9, 0, sample_id=-(2**63), event_time_ms=2**63 - 1
    )
    assert_same_sample(decode(encode(sample), U8), sample, None)


def test_binary_round_trip_of_a_non_contiguous_array() -> None:
    base = np.arange(12, dtype=np.uint8).reshape(3, 4)
    view = base[:2, ::2].T  # shape (2, 2) -> not C contiguous
    spec = StreamSpec((2, 2), "uint8", 10)
    got = decode(encode(Sample(view, 1)), spec)
    assert isinstance(got, Sample)
    np.testing.assert_array_equal(got.features, [[0, 4], [2, 6]])


def test_encode_refuses_what_the_format_cannot_carry() -> None:
    with pytest.raises(ValueError, match="must be uint8 or float32, got int64"):
        encode(Sample(np.zeros(3, np.int64), 0))
    with pytest.raises(ValueError, match=r"1\.\.4 dims, got shape \(1, 1, 1, 1, 1\)"):
        encode(Sample(np.zeros((1, 1, 1, 1, 1), np.uint8), 0))
    with pytest.raises(ValueError, match=r"task id must be in \[0, 65535\], got 65536"):
        encode(Sample(np.zeros(3, np.uint8), 0, task=65536))


# --- JSON round trips --------------------------------------------------------------------


def test_json_document_is_exactly_the_documented_fields() -> None:
    sample = Sample(np.array([[1, 2]], np.uint8), 3, task=4, sample_id=5, event_time_ms=6)
    doc = json.loads(encode_json(sample))
    assert doc == {"features": [[1, 2]], "label": 3, "sample_id": 5, "event_time_ms": 6, "task": 4}
    assert "task" not in json.loads(encode_json(Sample(np.array([1], np.uint8), 0)))


@pytest.mark.parametrize("task", [NO_TASK, 1])
def test_json_round_trip_uint8(task: int) -> None:
    sample = u8_sample(task=task)
    assert_same_sample(decode(encode_json(sample), U8, ORIGIN), sample, ORIGIN)


@pytest.mark.parametrize("task", [NO_TASK, 65535])
def test_json_round_trip_float32_is_exact(task: int) -> None:
    sample = f32_sample(task=task, values=[0.1, -2.5, 1.0e-38, 3.4e38])
    assert_same_sample(decode(encode_json(sample), F32), sample, None)


def test_json_with_surrounding_whitespace_and_defaults() -> None:
    payload = b'\n  {"features": [1, 2, 3, 4, 5, 6], "label": 2}  \n'
    got = decode(payload, U8)
    assert isinstance(got, Sample)
    np.testing.assert_array_equal(got.features, [[1, 2, 3], [4, 5, 6]])
    assert got.features.dtype == np.uint8
    assert (got.label, got.task, got.sample_id, got.event_time_ms) == (2, NO_TASK, 0, 0)


# --- one crafted payload per reject reason -----------------------------------------------


def test_reject_reasons_are_the_documented_set() -> None:
    assert set(REJECT_REASONS) == {
        "empty",
        "tombstone",
        "garbage",
        "truncated",
        "unknown_version",
        "wrong_dtype",
        "wrong_shape",
        "wrong_size",
        "non_finite",
        "label_out_of_range",
        "bad_task",
        "bad_flags",
        "bad_json",
        "missing_field",
    }


@pytest.mark.parametrize("payload", [b"\x00\x01garbage", b"S", b"CS" + bytes(40), b"[1, 2]"])
def test_garbage(payload: bytes) -> None:
    got = rejected(payload, U8)
    assert got.reason == "garbage"
    assert "neither binary magic" in got.detail


def test_empty_and_tombstone_values_have_their_own_reasons() -> None:
    assert rejected(b"", U8).reason == "empty"
    tombstone = decode(None, U8, Origin("t", 0, 5))
    assert isinstance(tombstone, Rejected)
    assert (tombstone.reason, tombstone.payload, tombstone.origin) == (
        "tombstone",
        b"",
        Origin("t", 0, 5),
    )


def test_json_after_a_utf8_byte_order_mark_is_accepted() -> None:
    sample = Sample(np.arange(6, dtype=np.uint8).reshape(2, 3), 3, task=1)
    got = decode(b"\xef\xbb\xbf" + encode_json(sample), U8)
    assert isinstance(got, Sample)
    assert (got.label, got.task) == (3, 1)
    np.testing.assert_array_equal(got.features, sample.features)
    bad = decode(b"\xef\xbb\xbf{", U8)  # rejected as JSON, payload kept whole
    assert isinstance(bad, Rejected) and bad.reason == "bad_json"
    assert bad.payload.startswith(b"\xef\xbb\xbf")


def test_truncated_header() -> None:
    got = rejected(encode(u8_sample())[:10], U8)
    assert got.reason == "truncated"
    assert got.detail == f"header needs {HEADER_SIZE} bytes, got 10"


def test_truncated_shape() -> None:
    payload = encode(u8_sample())[: HEADER_SIZE + 5]  # ndim 2 needs 8 shape bytes
    got = rejected(payload, U8)
    assert got.reason == "truncated"
    assert got.detail == f"shape needs {HEADER_SIZE + 8} bytes, got {HEADER_SIZE + 5}"


def test_truncated_features() -> None:
    full = encode(u8_sample())
    got = rejected(full[:-1], U8)
    assert got.reason == "truncated"
    assert got.detail == f"features need {len(full)} bytes, got {len(full) - 1}"


def test_extra_trailing_bytes_are_wrong_size() -> None:
    full = encode(u8_sample())
    got = rejected(full + b"\x00", U8)
    assert got.reason == "wrong_size"
    assert got.detail == f"expected {len(full)} bytes, got {len(full) + 1}"


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_version(version: int) -> None:
    payload = bytearray(encode(u8_sample()))
    payload[2] = version
    got = rejected(bytes(payload), U8)
    assert got.reason == "unknown_version"
    assert got.detail == f"wire version {version}, this reader knows 1"


def test_wrong_dtype_against_the_spec() -> None:
    got = rejected(encode(f32_sample()), StreamSpec((4,), "uint8", 5))
    assert got.reason == "wrong_dtype"
    assert got.detail == "expected uint8, got float32"


@pytest.mark.parametrize("code", [0, 3, 200])
def test_wrong_dtype_unknown_code(code: int) -> None:
    payload = bytearray(encode(u8_sample()))
    payload[3] = code
    got = rejected(bytes(payload), U8)
    assert got.reason == "wrong_dtype"
    assert got.detail == f"unknown dtype code {code}"


def test_wrong_shape_against_the_spec() -> None:
    sample = Sample(np.zeros((3, 2), np.uint8), 1)
    got = rejected(encode(sample), U8)
    assert got.reason == "wrong_shape"
    assert got.detail == "expected (2, 3), got (3, 2)"


@pytest.mark.parametrize("ndim", [0, 5, 255])
def test_wrong_shape_ndim_out_of_range(ndim: int) -> None:
    payload = bytearray(encode(u8_sample()))
    payload[4] = ndim
    got = rejected(bytes(payload), U8)
    assert got.reason == "wrong_shape"
    assert got.detail == f"ndim must be 1..4, got {ndim}"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_binary(bad: float) -> None:
    got = rejected(encode(f32_sample(values=[1.0, bad, 2.0, 3.0])), F32)
    assert got.reason == "non_finite"


def test_inf_minus_inf_is_caught_too() -> None:
    # Opposite infinities sum to NaN; the check must not cancel them out.
    got = rejected(encode(f32_sample(values=[float("inf"), float("-inf"), 0.0, 0.0])), F32)
    assert got.reason == "non_finite"


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("spec", [U8, StreamSpec((6,), "float32", 10)], ids=["uint8", "float32"])
def test_non_finite_json(token: str, spec: StreamSpec) -> None:
    payload = f'{{"features": [1, 2, 3, {token}, 5, 6], "label": 1}}'.encode()
    got = rejected(payload, spec)
    assert got.reason == "non_finite"


def test_float32_json_overflowing_float32_is_non_finite() -> None:
    # 1e300 is a finite float64 but becomes inf once stored as float32.
    got = rejected(b'{"features": [1e300, 0, 0, 0], "label": 0}', F32)
    assert got.reason == "non_finite"


@pytest.mark.parametrize("label", [10, 11, 2**31 - 1, -1, -(2**31)])
def test_label_out_of_range_binary(label: int) -> None:
    got = rejected(encode(u8_sample(label=label)), U8)
    assert got.reason == "label_out_of_range"
    assert got.detail == f"label must be in [0, 10), got {label}"


@pytest.mark.parametrize("label", [5, -1, 10**12])
def test_label_out_of_range_json(label: int) -> None:
    payload = json.dumps({"features": [0, 0, 0, 0], "label": label}).encode()
    got = rejected(payload, F32)
    assert got.reason == "label_out_of_range"
    assert got.detail == f"label must be in [0, 5), got {label}"


@pytest.mark.parametrize("task", [-2, 65536])
def test_bad_task_json(task: int) -> None:
    payload = json.dumps({"features": [0, 0, 0, 0], "label": 0, "task": task}).encode()
    got = rejected(payload, F32)
    assert got.reason == "bad_task"
    assert got.detail == f"task must be in [0, 65535], got {task}"


@pytest.mark.parametrize(
    "payload",
    [b"{not json", b'{"features": [1, 2', b"{\xff\xfe}", b" ", b'{"a": ' + b"[" * 100_000],
    ids=["syntax", "unterminated", "bad-utf8", "blank", "deep-nesting"],
)
def test_bad_json_unparsable(payload: bytes) -> None:
    got = rejected(payload, U8)
    assert got.reason == "bad_json"
    assert got.detail.startswith("not valid JSON")


@pytest.mark.parametrize(
    ("payload", "kind"), [(b" [1, 2]", "list"), (b" 3", "int"), (b' "x"', "str")]
)
def test_bad_json_not_an_object(payload: bytes, kind: str) -> None:
    got = rejected(payload, U8)
    assert got.reason == "bad_json"
    assert got.detail == f"expected a JSON object, got {kind}"


@pytest.mark.parametrize(
    ("doc", "missing"),
    [({"label": 1}, "features"), ({"features": [0] * 6}, "label"), ({}, "features, label")],
)
def test_missing_field(doc: dict[str, object], missing: str) -> None:
    got = rejected(json.dumps(doc).encode(), U8)
    assert got.reason == "missing_field"
    assert got.detail == f"missing {missing}"


@pytest.mark.parametrize(
    ("key", "value", "kind"),
    [
        ("label", 1.0, "float"),
        ("label", "1", "str"),
        ("label", None, "NoneType"),
        ("label", [1], "list"),
        ("label", True, "bool"),
        ("label", False, "bool"),
        ("task", True, "bool"),
        ("task", 1.5, "float"),
        ("sample_id", "7", "str"),
        ("event_time_ms", 1.0e12, "float"),
    ],
)
def test_bad_json_non_integer_fields(key: str, value: object, kind: str) -> None:
    doc = {"features": [0] * 6, "label": 1, key: value}
    got = rejected(json.dumps(doc).encode(), U8)
    assert got.reason == "bad_json"
    assert got.detail == f"{key} must be an integer, got {kind}"


@pytest.mark.parametrize("key", ["sample_id", "event_time_ms"])
@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**30])
def test_bad_json_integers_beyond_int64(key: str, value: int) -> None:
    # They would overflow the int64 columns of a Batch later, far from the message.
    doc = {"features": [0] * 6, "label": 1, key: value}
    got = rejected(json.dumps(doc).encode(), U8)
    assert got.reason == "bad_json"
    assert key in got.detail


def test_json_int64_bounds_themselves_are_accepted() -> None:
    doc = {"features": [0] * 6, "label": 1, "sample_id": 2**63 - 1, "event_time_ms": -(2**63)}
    got = decode(json.dumps(doc).encode(), U8)
    assert isinstance(got, Sample)
    assert (got.sample_id, got.event_time_ms) == (2**63 - 1, -(2**63))


@pytest.mark.parametrize(
    "features",
    ['"abc"', "[[1, 2, 3], [4, 5]]", '{"a": 1}', '[1, 2, "x", 4, 5, 6]'],
    ids=["string", "ragged", "object", "mixed"],
)
def test_bad_json_features_not_numeric(features: str) -> None:
    got = rejected(f'{{"features": {features}, "label": 1}}'.encode(), U8)
    assert got.reason == "bad_json"
    assert got.detail.startswith("features must be a numeric array")


def test_json_integer_literal_too_long_for_python_is_bad_json() -> None:
    # Python refuses int literals past 4,300 digits with a plain ValueError (not a
    # JSONDecodeError); a producer sending one must not crash the consumer.
    payload = b'{"features": [0, 0, 0, 0, 0, 0], "label": ' + b"9" * 5000 + b"}"
    got = rejected(payload, U8)
    assert got.reason == "bad_json"


def test_json_bare_integer_literal_too_long_is_bad_json() -> None:
    got = rejected(b" " + b"1" * 5000, U8)
    assert got.reason == "bad_json"


@pytest.mark.parametrize("spec", [U8, StreamSpec((6,), "float32", 10)], ids=["uint8", "float32"])
def test_json_feature_integer_beyond_float_range_is_rejected(spec: StreamSpec) -> None:
    # 10**400 is a valid JSON number but no float64 can hold it.
    payload = b'{"features": [1, 2, 3, 4, 5, ' + b"1" + b"0" * 400 + b'], "label": 1}'
    got = rejected(payload, spec)
    assert got.reason in ("bad_json", "wrong_dtype", "non_finite")


@pytest.mark.parametrize("features", [[0] * 5, [0] * 7, [[0] * 6] * 2, 0, [[0] * 2] * 3])
def test_wrong_shape_json(features: object) -> None:
    got = rejected(json.dumps({"features": features, "label": 1}).encode(), U8)
    assert got.reason == "wrong_shape"
    assert got.detail.startswith("expected (2, 3), got shape")


def test_json_and_binary_accept_the_same_shapes_flat_or_declared() -> None:
    for features in (np.arange(6, dtype=np.uint8), np.arange(6, dtype=np.uint8).reshape(2, 3)):
        for payload in (encode(Sample(features, 1)), encode_json(Sample(features, 1))):
            got = decode(payload, U8)
            assert isinstance(got, Sample)
            np.testing.assert_array_equal(got.features, [[0, 1, 2], [3, 4, 5]])
        transposed = features.reshape(3, 2)  # the right size, another shape: a mistake
        for payload in (encode(Sample(transposed, 1)), encode_json(Sample(transposed, 1))):
            assert rejected(payload, U8).reason == "wrong_shape"


@pytest.mark.parametrize("value", ["256", "-1", "1.5", "1e3"])
def test_json_uint8_features_outside_the_byte_range_are_wrong_dtype(value: str) -> None:
    got = rejected(f'{{"features": [0, 0, 0, 0, 0, {value}], "label": 1}}'.encode(), U8)
    assert got.reason == "wrong_dtype"
    assert got.detail == "uint8 features must be integers in [0, 255]"


def test_json_uint8_features_written_as_whole_floats_are_accepted() -> None:
    got = decode(b'{"features": [0.0, 1.0, 2.0, 253.0, 254.0, 255.0], "label": 1}', U8)
    assert isinstance(got, Sample)
    np.testing.assert_array_equal(got.features.ravel(), [0, 1, 2, 253, 254, 255])


# --- properties ---------------------------------------------------------------------------

_HEADER = struct.Struct("<2sBBBBHiqq")

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**1024, max_value=2**1100),  # valid JSON, beyond any float64
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=7), max_leaves=20)
json_docs = st.dictionaries(
    st.sampled_from(["features", "label", "task", "sample_id", "event_time_ms", "other"]),
    json_values,
)
plausible_docs = st.fixed_dictionaries(
    {"features": json_values, "label": st.integers(0, 4) | json_scalars},
    optional={"task": st.integers(-2, 3) | json_scalars, "sample_id": json_scalars},
)


@st.composite
def mutated_binary(draw: st.DrawFn) -> bytes:
    """A valid header with arbitrary fields, then arbitrary bytes: reaches every branch."""
    header = _HEADER.pack(
        b"SC",
        draw(st.sampled_from([1, 1, 1, 0, 2])),
        draw(st.integers(0, 3)),
        draw(st.integers(0, 6)),
        draw(st.integers(0, 255)),
        draw(st.integers(0, 0xFFFF)),
        draw(st.integers(-(2**31), 2**31 - 1)),
        draw(st.integers(-(2**63), 2**63 - 1)),
        draw(st.integers(-(2**63), 2**63 - 1)),
    )
    dims = draw(st.lists(st.integers(0, 2**32 - 1) | st.sampled_from([2, 3, 4]), max_size=4))
    tail = b"".join(d.to_bytes(4, "little") for d in dims) + draw(st.binary(max_size=40))
    return (header + tail)[: draw(st.integers(0, 200))]


arbitrary_payloads = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=100).map(lambda b: b"SC" + b),
    st.binary(max_size=100).map(lambda b: b"{" + b),
    st.text(max_size=60).map(lambda s: (" " + s).encode()),
    json_docs.map(lambda d: json.dumps(d).encode()),
    plausible_docs.map(lambda d: json.dumps(d).encode()),
    mutated_binary(),
)


@settings(max_examples=600, derandomize=True, database=None, deadline=None)
@given(payload=arbitrary_payloads, spec=st.sampled_from([U8, F32]))
def test_decode_never_raises_and_rejections_carry_a_known_reason(
    payload: bytes, spec: StreamSpec
) -> None:
    result = decode(payload, spec, ORIGIN)
    assert isinstance(result, (Sample, Rejected))
    if isinstance(result, Rejected):
        assert result.reason in REJECT_REASONS
        assert result.payload == payload
        assert result.origin == ORIGIN
    else:
        assert result.features.shape == spec.feature_shape
        assert result.features.dtype == np.dtype(spec.dtype)
        assert 0 <= result.label < spec.num_classes
        assert result.task == NO_TASK or 0 <= result.task <= 0xFFFF


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(
    payload=st.binary(max_size=200).filter(
        lambda b: b[:2] != b"SC" and b.removeprefix(b"\xef\xbb\xbf")[:1] not in b"{ \n\t\r"
    )
)
def test_anything_without_magic_or_brace_is_garbage(payload: bytes) -> None:
    result = decode(payload, U8)
    assert isinstance(result, Rejected)
    assert result.reason == "garbage"


@settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    features=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=4, max_side=4)),
    label=st.integers(0, 9),
    task=st.one_of(st.just(NO_TASK), st.integers(0, 0xFFFF)),
    sample_id=st.integers(-(2**63), 2**63 - 1),
    event_time_ms=st.integers(-(2**63), 2**63 - 1),
    as_json=st.booleans(),
)
def test_any_valid_uint8_sample_round_trips(
    features: np.ndarray, label: int, task: int, sample_id: int, event_time_ms: int, as_json: bool
) -> None:
    sample = Sample(features, label, task, sample_id, event_time_ms)
    spec = StreamSpec(tuple(features.shape), "uint8", 10)
    payload = encode_json(sample) if as_json else encode(sample)
    assert_same_sample(decode(payload, spec), sample, None)


@settings(max_examples=150, derandomize=True, database=None, deadline=None)
@given(
    features=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=4),
        elements=st.floats(allow_nan=False, allow_infinity=False, width=32),
    ),
    as_json=st.booleans(),
)
def test_any_finite_float32_sample_round_trips(features: np.ndarray, as_json: bool) -> None:
    sample = Sample(features, 1, NO_TASK, 0, 0)
    spec = StreamSpec(tuple(features.shape), "float32", 2)
    payload = encode_json(sample) if as_json else encode(sample)
    assert_same_sample(decode(payload, spec), sample, None)


@pytest.mark.parametrize(
    ("flags", "task", "detail"),
    [
        (0, 3, "task field is 3 but flag bit 0 (task present) is clear"),
        (0x02, 0, "reserved flag bits set: flags=0x02 (only bit 0 is defined)"),
        (0x81, 3, "reserved flag bits set: flags=0x81 (only bit 0 is defined)"),
    ],
)
def test_contradictory_or_reserved_flags_are_rejected(flags: int, task: int, detail: str) -> None:
    payload = bytearray(encode(u8_sample()))
    payload[5] = flags
    payload[6:8] = task.to_bytes(2, "little")
    got = rejected(bytes(payload), U8)
    assert (got.reason, got.detail) == ("bad_flags", detail)


@pytest.mark.parametrize("spec", [U8, F32], ids=["uint8", "float32"])
def test_decode_many_gives_decodes_verdicts_in_order(spec: StreamSpec) -> None:
    good = u8_sample() if spec is U8 else f32_sample()
    binary = encode(good)
    tasked = encode(dataclasses.replace(good, task=3, label=2, sample_id=5))
    flat = encode(dataclasses.replace(good, features=good.features.reshape(-1)))
    bad_label = encode(dataclasses.replace(good, label=spec.num_classes))
    bad_flags = bytearray(binary)
    bad_flags[5] = 0x02
    payloads: list[bytes | None] = [
        binary,
        b"garbage",
        tasked,
        encode_json(good),
        bad_label,
        flat,
        None,
        bytes(bad_flags),
        binary[:-1],
        b"",
        tasked,
    ]
    if spec is F32:
        payloads.append(encode(f32_sample(values=[0.0, float("nan"), 1.0, 2.0])))
    origins = [Origin("t", 0, i) for i in range(len(payloads))]
    batch, rejects = decode_many(payloads, spec, origins)
    one_by_one = [decode(p, spec, o) for p, o in zip(payloads, origins, strict=True)]
    samples = [r for r in one_by_one if isinstance(r, Sample)]
    assert rejects == [r for r in one_by_one if isinstance(r, Rejected)]
    assert batch is not None and len(batch) == len(samples) == 5
    expected = Batch.from_samples(samples)
    np.testing.assert_array_equal(batch.features, expected.features)
    for column in ("labels", "tasks", "sample_ids", "event_times_ms"):
        np.testing.assert_array_equal(getattr(batch, column), getattr(expected, column))
    assert batch.origins == expected.origins


def test_decode_many_of_rejects_only_gives_no_batch() -> None:
    batch, rejects = decode_many([b"x", None], U8)
    assert batch is None and [r.reason for r in rejects] == ["garbage", "tombstone"]
