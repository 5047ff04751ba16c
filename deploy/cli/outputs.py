"""Check where a run will write before it starts: a bad path fails at once, not after the run."""

from __future__ import annotations

import tempfile
from pathlib import Path

from streamcl.ingest.errors import ConfigError


def check_file(path: Path | str | None, what: str) -> None:
    """Create `path`'s directories and prove the file can be written; adds no file.

    An existing file is opened for append (its content is kept), so a read-only
    report or a path naming a directory fail here.
    """
    if path is None:
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        with open(path, "ab"):
            pass
        if not existed:
            path.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write the {what} to {path}: {_reason(err)}") from err


def check_dir(path: Path | str | None, what: str) -> None:
    """Create directory `path` and prove a file can be written in it."""
    if path is None:
        return
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(f"cannot write the {what} to {path}: {_reason(err)}") from err


def _reason(err: OSError) -> str:
    where = f" ({err.filename})" if err.filename else ""
    return f"{err.strerror or err}{where}"
