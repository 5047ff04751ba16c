"""JSON that strict parsers accept: NaN and infinities become null.

RFC 8259 has no NaN or Infinity; Python's `json` writes them by default and
`JSON.parse`, Go, Rust and Java parsers reject the whole document. Whoever writes a
null where a metric is undefined also says why beside it (e.g. a report's
`null_reasons`).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def finite(value: Any) -> Any:
    """`value` with every non-finite float (also in containers and numpy) replaced by None."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    if isinstance(value, np.ndarray):
        return finite(value.tolist())
    if isinstance(value, np.integer):
        return int(value)
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """`json.dumps` of `finite(value)`; never writes NaN or Infinity."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)
