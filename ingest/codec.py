"""The wire codec: compact binary by default, JSON accepted, validation with a reason.

The format is specified in ingest/wire-format.md (byte offsets, codes, version policy)
and pinned by the test vectors in tests/vectors/. In short, little endian, version 1::

    magic  "SC"   2 bytes
    version       u8    (1)
    dtype         u8    (1 = uint8, 2 = float32)
    ndim          u8    (1..4)
    flags         u8    (bit 0: a task id is present; bits 1-7 reserved, zero)
    task          u16   (zero unless flag bit 0 is set)
    label         i32
    sample_id     i64
    event_time_ms i64
    shape         ndim x u32 (the stream's shape, or flat: one dim of all its elements)
    features      prod(shape) x itemsize raw bytes, C order

Decoding is `struct.unpack_from` plus `numpy.frombuffer`: no per-element parsing.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from typing import Final, Literal

import numpy as np

from streamcl.ingest.schema import NO_TASK, Batch, Origin, Rejected, Sample, StreamSpec

RejectReason = Literal[
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
]
REJECT_REASONS: Final[tuple[str, ...]] = RejectReason.__args__  # type: ignore[attr-defined]

MAGIC: Final = b"SC"
UTF8_BOM: Final = b"\xef\xbb\xbf"
"""Some producers (.NET, Windows tools) start JSON text with it; RFC 8259 lets readers skip it."""
VERSION: Final = 1
_HEADER = struct.Struct("<2sBBBBHiqq")
_DTYPE_CODES: Final = {"uint8": 1, "float32": 2}
_CODE_DTYPES: Final = {v: k for k, v in _DTYPE_CODES.items()}
_SHAPES: Final = tuple(struct.Struct(f"<{n}I") for n in range(5))
_HAS_TASK: Final = 0x01
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_MAX_TASK: Final = 0xFFFF


def encode(sample: Sample) -> bytes:
    """Encode a sample in the binary wire format."""
    features = np.ascontiguousarray(sample.features)
    dtype_code = _DTYPE_CODES.get(str(features.dtype))
    if dtype_code is None:
        raise ValueError(f"features must be uint8 or float32, got {features.dtype}")
    if not 1 <= features.ndim <= 4:
        raise ValueError(f"features must have 1..4 dims, got shape {features.shape}")
    has_task = sample.task != NO_TASK
    if has_task and not 0 <= sample.task <= _MAX_TASK:
        raise ValueError(f"task id must be in [0, {_MAX_TASK}], got {sample.task}")
    header = _HEADER.pack(
        MAGIC,
        VERSION,
        dtype_code,
        features.ndim,
        _HAS_TASK if has_task else 0,
        sample.task if has_task else 0,
        sample.label,
        sample.sample_id,
        sample.event_time_ms,
    )
    shape = _SHAPES[features.ndim].pack(*features.shape)
    return header + shape + features.tobytes()


def encode_json(sample: Sample) -> bytes:
    """Encode a sample as a JSON value, for producers that cannot write the binary format."""
    doc: dict[str, object] = {
        "features": sample.features.tolist(),
        "label": sample.label,
        "sample_id": sample.sample_id,
        "event_time_ms": sample.event_time_ms,
    }
    if sample.task != NO_TASK:
        doc["task"] = sample.task
    return json.dumps(doc, separators=(",", ":")).encode()


def decode(
    payload: bytes | None, spec: StreamSpec, origin: Origin | None = None
) -> Sample | Rejected:
    """Decode and validate one message; bad input becomes a `Rejected` value, never an error.

    `None` is a Kafka tombstone (a null value): rejected as `tombstone`, apart from an
    empty value (`empty`). JSON may start with a UTF-8 byte-order mark.
    """
    if payload is None:
        return Rejected(b"", "tombstone", "null value (a tombstone), not a sample", origin)
    if not payload:
        return Rejected(payload, "empty", "empty value, not a sample", origin)
    text = payload[len(UTF8_BOM) :] if payload.startswith(UTF8_BOM) else payload
    if payload[:2] == MAGIC:
        result = _decode_binary(payload, spec, origin)
    elif text[:1] in (b"{", b" ", b"\n", b"\t", b"\r"):
        result = _decode_json(text, spec, origin)
    else:
        return Rejected(payload, "garbage", "neither binary magic 'SC' nor a JSON object", origin)
    if isinstance(result, tuple):
        reason, detail = result
        return Rejected(payload, reason, detail, origin)
    return result


def decode_many(
    payloads: Sequence[bytes | None],
    spec: StreamSpec,
    origins: Sequence[Origin | None] | None = None,
) -> tuple[Batch | None, list[Rejected]]:
    """Decode and validate messages into one `Batch` (valid ones, in order) and the rejects.

    The same verdicts as `decode` on each: binary messages in the spec's own shape are
    checked together, their features copied straight into one array `[n, *shape]`; any
    other message (JSON, a flat shape, anything invalid) goes through `decode` alone,
    which gives the reason.
    """
    n = len(payloads)
    ndim = len(spec.feature_shape)
    start = _HEADER.size + 4 * ndim
    size = start + spec.feature_nbytes
    fast = np.fromiter(
        (p is not None and len(p) == size and p[:2] == MAGIC for p in payloads), bool, n
    )
    rows = np.flatnonzero(fast)
    raw = np.frombuffer(b"".join([payloads[i] for i in rows.tolist()]), np.uint8)  # type: ignore[misc]
    raw = raw.reshape(len(rows), size)
    head = np.ascontiguousarray(raw[:, :start]).view(_header_dtype(ndim))[:, 0]
    features = raw[:, start:].view(spec.dtype).reshape(len(rows), *spec.feature_shape)
    labels = head["label"].astype(np.int64)
    ok = (
        (head["version"] == VERSION)
        & (head["dtype"] == _DTYPE_CODES[spec.dtype])
        & (head["ndim"] == ndim)
        & ((head["flags"] == _HAS_TASK) | ((head["flags"] == 0) & (head["task"] == 0)))
        & (head["shape"] == np.array(spec.feature_shape)).all(axis=1)
        & (labels >= 0)
        & (labels < spec.num_classes)
    )
    if spec.dtype == "float32" and len(rows):
        with np.errstate(invalid="ignore", over="ignore"):
            ok &= np.isfinite(features.reshape(len(rows), -1).sum(axis=1, dtype=np.float64))
    fast[rows[~ok]] = False
    valid = fast.copy()
    out_features = np.empty((n, *spec.feature_shape), spec.dtype)
    out_features[rows[ok]] = features[ok]
    columns = np.zeros((4, n), np.int64)  # labels, tasks, sample ids, event times
    columns[0, rows] = labels
    columns[1, rows] = np.where(head["flags"] == _HAS_TASK, head["task"].astype(np.int64), NO_TASK)
    columns[2, rows] = head["sample_id"]
    columns[3, rows] = head["event_time_ms"]
    rejects: list[Rejected] = []
    for i in np.flatnonzero(~fast).tolist():
        result = decode(payloads[i], spec, origins[i] if origins is not None else None)
        if isinstance(result, Rejected):
            rejects.append(result)
            continue
        valid[i] = True
        out_features[i] = result.features
        columns[:, i] = (result.label, result.task, result.sample_id, result.event_time_ms)
    if not valid.any():
        return None, rejects
    keep = None if valid.all() else np.flatnonzero(valid)
    if keep is not None:
        out_features, columns = out_features[keep], columns[:, keep]
    kept_origins = (
        (tuple(origins) if keep is None else tuple(origins[i] for i in keep.tolist()))
        if origins is not None
        else ()
    )
    return Batch(
        out_features, columns[0], columns[1], columns[2], columns[3], kept_origins
    ), rejects


def _header_dtype(ndim: int) -> np.dtype:
    """The binary header and shape as one packed little-endian record."""
    return np.dtype(
        [
            ("magic", "S2"),
            ("version", "u1"),
            ("dtype", "u1"),
            ("ndim", "u1"),
            ("flags", "u1"),
            ("task", "<u2"),
            ("label", "<i4"),
            ("sample_id", "<i8"),
            ("event_time_ms", "<i8"),
            ("shape", "<u4", (ndim,)),
        ]
    )


def _decode_binary(
    payload: bytes, spec: StreamSpec, origin: Origin | None
) -> Sample | tuple[RejectReason, str]:
    if len(payload) < _HEADER.size:
        return "truncated", f"header needs {_HEADER.size} bytes, got {len(payload)}"
    _, version, dtype_code, ndim, flags, task, label, sample_id, event_time = _HEADER.unpack_from(
        payload
    )
    if version != VERSION:
        return "unknown_version", f"wire version {version}, this reader knows {VERSION}"
    if flags & ~_HAS_TASK:
        return "bad_flags", f"reserved flag bits set: flags=0x{flags:02x} (only bit 0 is defined)"
    if task and not flags & _HAS_TASK:
        return "bad_flags", f"task field is {task} but flag bit 0 (task present) is clear"
    dtype = _CODE_DTYPES.get(dtype_code)
    if dtype is None:
        return "wrong_dtype", f"unknown dtype code {dtype_code}"
    if dtype != spec.dtype:
        return "wrong_dtype", f"expected {spec.dtype}, got {dtype}"
    if not 1 <= ndim <= 4:
        return "wrong_shape", f"ndim must be 1..4, got {ndim}"
    shape_end = _HEADER.size + 4 * ndim
    if len(payload) < shape_end:
        return "truncated", f"shape needs {shape_end} bytes, got {len(payload)}"
    shape = _SHAPES[ndim].unpack_from(payload, _HEADER.size)
    if shape not in (spec.feature_shape, (spec.feature_size,)):
        return "wrong_shape", f"expected {spec.feature_shape}, got {shape}"
    expected = shape_end + spec.feature_nbytes
    if len(payload) < expected:
        return "truncated", f"features need {expected} bytes, got {len(payload)}"
    if len(payload) > expected:
        return "wrong_size", f"expected {expected} bytes, got {len(payload)}"
    features = np.frombuffer(payload, dtype=dtype, offset=shape_end).reshape(spec.feature_shape)
    return _checked(
        spec, features, label, task if flags & _HAS_TASK else NO_TASK, sample_id, event_time, origin
    )


def _decode_json(
    payload: bytes, spec: StreamSpec, origin: Origin | None
) -> Sample | tuple[RejectReason, str]:
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError) as err:  # ValueError covers decode errors and huge ints
        return "bad_json", f"not valid JSON: {err}"[:200]
    if not isinstance(doc, dict):
        return "bad_json", f"expected a JSON object, got {type(doc).__name__}"
    missing = [key for key in ("features", "label") if key not in doc]
    if missing:
        return "missing_field", f"missing {', '.join(missing)}"
    ints: dict[str, int] = {}
    for key, default in (("label", 0), ("task", NO_TASK), ("sample_id", 0), ("event_time_ms", 0)):
        value = doc.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            return "bad_json", f"{key} must be an integer, got {type(value).__name__}"
        if not _INT64_MIN <= value <= _INT64_MAX:
            return "bad_json", f"{key} must fit in 64 bits, got {value}"
        ints[key] = value
    task = ints["task"]
    if task != NO_TASK and not 0 <= task <= _MAX_TASK:
        return "bad_task", f"task must be in [0, {_MAX_TASK}], got {task}"
    try:
        features = np.asarray(doc["features"], dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as err:
        return "bad_json", f"features must be a numeric array: {err}"[:200]
    if features.shape not in (spec.feature_shape, (spec.feature_size,)):
        return "wrong_shape", f"expected {spec.feature_shape}, got shape {features.shape}"
    features = features.reshape(spec.feature_shape)
    if spec.dtype == "uint8":
        if not np.all(np.isfinite(features)):
            return "non_finite", "features contain NaN or infinity"
        if np.any((features < 0) | (features > 255) | (features != np.round(features))):
            return "wrong_dtype", "uint8 features must be integers in [0, 255]"
    with np.errstate(over="ignore"):  # out-of-range float32 becomes inf: non_finite below
        typed = features.astype(spec.dtype)
    return _checked(
        spec,
        typed,
        ints["label"],
        task,
        ints["sample_id"],
        ints["event_time_ms"],
        origin,
    )


def _checked(
    spec: StreamSpec,
    features: np.ndarray,
    label: int,
    task: int,
    sample_id: int,
    event_time_ms: int,
    origin: Origin | None,
) -> Sample | tuple[RejectReason, str]:
    if not 0 <= label < spec.num_classes:
        return "label_out_of_range", f"label must be in [0, {spec.num_classes}), got {label}"
    if spec.dtype == "float32" and not _all_finite(features):
        return "non_finite", "features contain NaN or infinity"
    return Sample(features, int(label), int(task), int(sample_id), int(event_time_ms), origin)


def _all_finite(features: np.ndarray) -> bool:
    # sum() is one pass; a NaN or inf anywhere makes it non-finite (overflow of finite
    # float32 values to inf is impossible in float64 accumulation at these sizes).
    with np.errstate(invalid="ignore", over="ignore"):  # inf + -inf is NaN: still caught
        return math.isfinite(float(features.sum(dtype=np.float64)))
