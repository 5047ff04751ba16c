"""A producer of streamcl's binary wire format written only from ingest/wire-format.md.

It imports nothing of streamcl's: it stands for a producer in another language, so a
message it writes and the service learns shows the spec is enough to implement.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

HEADER = struct.Struct("<2sBBBBHiqq")  # 28 bytes: the table in ingest/wire-format.md
DTYPES = {"uint8": (1, "B"), "float32": (2, "f")}
HAS_TASK = 0x01


def encode(
    features: Sequence[float],
    shape: Sequence[int],
    dtype: str,
    label: int,
    task: int | None = None,
    sample_id: int = 0,
    event_time_ms: int = 0,
    *,
    version: int = 1,
    flags: int | None = None,
    byte_order: str = "<",
) -> bytes:
    """One message; `features` flat in C order. `version`, `flags` and `byte_order`
    exist to write the invalid messages of the test vectors."""
    code, char = DTYPES[dtype]
    if flags is None:
        flags = HAS_TASK if task is not None else 0
    if len(features) != math.prod(shape):
        raise ValueError(f"{len(features)} features for shape {tuple(shape)}")
    header = struct.pack(
        byte_order + "2sBBBBHiqq",
        b"SC",
        version,
        code,
        len(shape),
        flags,
        task or 0,
        label,
        sample_id,
        event_time_ms,
    )
    dims = struct.pack(f"{byte_order}{len(shape)}I", *shape)
    return header + dims + struct.pack(f"{byte_order}{len(features)}{char}", *features)
