"""What every benchmark writes beside its figures: the machine they came from, one file.

The benchmarks run as scripts (`python benchmarks/NAME.py`), so this sibling module is
importable as `_report`.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch


def machine(**extra: Any) -> dict[str, Any]:
    """CPU count, platform and versions: figures only compare on the same machine."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **extra,
    }


def write_results(path: Path, result: dict[str, Any]) -> None:
    """Write `result` as indented JSON at `path` (folders made) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
