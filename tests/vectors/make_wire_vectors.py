"""Write tests/vectors/wire-v1.json: valid and invalid messages with their expected decode.

Built with tests/wire_spec_producer.py (from ingest/wire-format.md alone), never with
streamcl's codec, so the vectors check the codec rather than echo it. Run from the
repository root: `python -m tests.vectors.make_wire_vectors`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.wire_spec_producer import encode

OUT = Path(__file__).with_name("wire-v1.json")
U8 = {"feature_shape": [2, 3], "dtype": "uint8", "num_classes": 10}
F32 = {"feature_shape": [4], "dtype": "float32", "num_classes": 5}
PIXELS = [0, 40, 80, 120, 160, 255]
BOM = b"\xef\xbb\xbf"


def sample(
    features: list[float], label: int, task: int | None, sample_id: int, event_time_ms: int
) -> dict[str, Any]:
    return {
        "features": features,
        "label": label,
        "task": task,
        "sample_id": sample_id,
        "event_time_ms": event_time_ms,
    }


def vectors() -> list[dict[str, Any]]:
    good = encode(PIXELS, [2, 3], "uint8", 7, 5, 12345, 1_700_000_000_123)
    json_doc = json.dumps({"features": [PIXELS[:3], PIXELS[3:]], "label": 2, "task": 1}).encode()
    out: list[dict[str, Any]] = [
        {
            "name": "uint8 2x3 with task",
            "spec": U8,
            "payload": good,
            "sample": sample(PIXELS, 7, 5, 12345, 1_700_000_000_123),
        },
        {
            "name": "uint8 without task",
            "spec": U8,
            "payload": encode(PIXELS, [2, 3], "uint8", 0),
            "sample": sample(PIXELS, 0, None, 0, 0),
        },
        {
            "name": "uint8 flat shape [6] for a 2x3 stream",
            "spec": U8,
            "payload": encode(PIXELS, [6], "uint8", 1, 0, 1, 2),
            "sample": sample(PIXELS, 1, 0, 1, 2),
        },
        {
            "name": "float32 with extreme header values",
            "spec": F32,
            "payload": encode([-1.5, 0.0, 3.25, 1e-30], [4], "float32", 4, 65535, -1, 2**63 - 1),
            "sample": sample([-1.5, 0.0, 3.25, 1e-30], 4, 65535, -1, 2**63 - 1),
        },
        {
            "name": "JSON object",
            "spec": U8,
            "payload": json_doc,
            "sample": sample(PIXELS, 2, 1, 0, 0),
        },
        {
            "name": "JSON object after a UTF-8 byte-order mark",
            "spec": U8,
            "payload": BOM + json_doc,
            "sample": sample(PIXELS, 2, 1, 0, 0),
        },
    ]
    invalid = [
        ("not a sample", U8, b"hello", "garbage"),
        ("empty value", U8, b"", "empty"),
        ("header cut at 20 bytes", U8, good[:20], "truncated"),
        ("features one byte short", U8, good[:-1], "truncated"),
        ("one byte too many", U8, good + b"\x00", "wrong_size"),
        ("version 2", U8, encode(PIXELS, [2, 3], "uint8", 7, version=2), "unknown_version"),
        ("float32 on a uint8 stream", U8, encode([0.0] * 6, [2, 3], "float32", 1), "wrong_dtype"),
        ("transposed shape 3x2", U8, encode(PIXELS, [3, 2], "uint8", 1), "wrong_shape"),
        ("big-endian", U8, encode(PIXELS, [2, 3], "uint8", 3, 5, byte_order=">"), "wrong_shape"),
        ("label 10 of 10 classes", U8, encode(PIXELS, [2, 3], "uint8", 10), "label_out_of_range"),
        ("negative label", U8, encode(PIXELS, [2, 3], "uint8", -1), "label_out_of_range"),
        ("NaN feature", F32, encode([0.0, float("nan"), 0, 0], [4], "float32", 1), "non_finite"),
        (
            "task id without its flag",
            U8,
            encode(PIXELS, [2, 3], "uint8", 1, 3, flags=0),
            "bad_flags",
        ),
        ("reserved flag bit", U8, encode(PIXELS, [2, 3], "uint8", 1, flags=0x02), "bad_flags"),
        ("JSON cut short", U8, json_doc[:-2], "bad_json"),
        ("JSON without label", U8, b'{"features": [0, 0, 0, 0, 0, 0]}', "missing_field"),
    ]
    out += [
        {"name": name, "spec": spec, "payload": payload, "reject": reason}
        for name, spec, payload, reason in invalid
    ]
    return out


def document() -> dict[str, Any]:
    """The vectors file: each payload as hex; `sample` (decoded) or `reject` (the reason)."""
    return {
        "format": "streamcl wire format, version 1 (ingest/wire-format.md)",
        "vectors": [
            {**{k: v for k, v in v.items() if k != "payload"}, "hex": v["payload"].hex()}
            for v in vectors()
        ],
    }


def render() -> str:
    """The file's text: one vector per line, so a diff shows which vector changed."""
    doc = document()
    lines = [json.dumps(v) for v in doc["vectors"]]
    body = ",\n  ".join(lines)
    return f'{{\n "format": {json.dumps(doc["format"])},\n "vectors": [\n  {body}\n ]\n}}\n'


def main() -> None:
    OUT.write_text(render())


if __name__ == "__main__":
    main()
