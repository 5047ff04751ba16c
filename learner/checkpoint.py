"""Checkpoints (full learner state + source offsets) and model snapshots for serving.

Checkpoints are written atomically (temp file, fsync, rename, fsync of the directory)
and loaded with `torch.load(weights_only=True)`: tensors and plain containers only,
never arbitrary pickled objects. Each holds a SHA-256 of its content (every tensor's
dtype, shape and bytes, every key and scalar), checked on load: torch's loader checks
no content, so flipped bits or a torn write on a bad disk would otherwise be resumed
from. The last `keep` are kept; a checkpoint that fails to load or to verify is
reported and the previous one is tried.

Snapshots are weights only (safetensors) plus a small JSON of metadata, for serving
systems that must not run our code to read a model.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn

from streamcl.ingest import strictjson
from streamcl.ingest.errors import StreamclError

log = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_SUFFIX = ".pt"
CHECKPOINT_FORMAT = "streamcl-checkpoint/1"
LoadFailure = Literal["unreadable", "checksum"]
CHECKPOINT_LOAD_FAILURES: tuple[LoadFailure, ...] = ("unreadable", "checksum")


class CheckpointError(StreamclError):
    """No usable checkpoint could be written or read."""


class ChecksumError(CheckpointError):
    """A checkpoint loaded but its content is not what was written."""


@dataclass(frozen=True)
class Skipped:
    """A newer checkpoint passed over at load time, and why."""

    path: Path
    reason: LoadFailure
    error: str


@dataclass(frozen=True)
class Restored:
    """A loaded checkpoint, where it came from, and the newer ones that were skipped."""

    path: Path
    state: dict[str, Any]
    skipped: tuple[Skipped, ...] = ()


class CheckpointStore:
    """A directory of numbered checkpoints, newest last."""

    def __init__(self, directory: str | Path, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)

    def paths(self) -> list[Path]:
        """Checkpoint files, oldest first (numbered by sequence, not by mtime)."""
        found = []
        for path in self.directory.glob(f"{CHECKPOINT_PREFIX}*{CHECKPOINT_SUFFIX}"):
            sequence = _sequence(path)
            if sequence is not None:
                found.append((sequence, path))
        return [path for _, path in sorted(found)]

    def save(self, state: dict[str, Any]) -> Path:
        """Write the next checkpoint atomically, then drop all but the newest `keep`."""
        existing = self.paths()
        sequence = (_sequence(existing[-1]) or 0) + 1 if existing else 1
        path = self.directory / f"{CHECKPOINT_PREFIX}{sequence:09d}{CHECKPOINT_SUFFIX}"
        write_checkpoint(path, state)
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def space_needed(self, checkpoint_bytes: int) -> int:
        """Free bytes the directory needs to hold `keep` + 1 checkpoints of this size.

        A new checkpoint is written before the oldest is removed, so at the moment of
        writing there are keep + 1 of them; the ones already here count as held.
        """
        held = sum(path.stat().st_size for path in self.paths()[-self.keep :])
        return max(0, (self.keep + 1) * checkpoint_bytes - held)

    def load_latest(self) -> Restored | None:
        """The newest checkpoint that loads and verifies; None when there is none at all."""
        paths = self.paths()
        last_error: Exception | None = None
        skipped: list[Skipped] = []
        for path in reversed(paths):
            try:
                return Restored(path, read_checkpoint(path), tuple(skipped))
            except Exception as err:  # any unusable file means: try the previous one
                reason: LoadFailure = "checksum" if isinstance(err, ChecksumError) else "unreadable"
                log.error(
                    "checkpoint %s, trying the previous path=%s error=%s",
                    "fails its checksum" if reason == "checksum" else "unreadable",
                    path,
                    err,
                )
                skipped.append(Skipped(path, reason, str(err)))
                last_error = err
        if paths:
            raise CheckpointError(
                f"none of {len(paths)} checkpoints in {self.directory} loads"
            ) from last_error
        return None


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Save `state` atomically with the SHA-256 of its content."""
    envelope = {"format": CHECKPOINT_FORMAT, "sha256": content_digest(state), "state": state}
    write_atomically(path, lambda f: torch.save(envelope, f))


def serialised_size(state: dict[str, Any]) -> int:
    """Bytes `write_checkpoint` would write for `state` (serialised in memory)."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "sha256": "0" * 64, "state": state}, buffer)
    return buffer.tell()


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by `write_checkpoint` (weights only) and verify its content.

    Raises `ChecksumError` when the content differs from what was written, and
    `CheckpointError` when the file is not a streamcl checkpoint.
    """
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files
            warnings.simplefilter("ignore")
            envelope = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's own text advises unsafe loading: never pass it on
        raise CheckpointError(f"{path} is not a streamcl checkpoint: {_unreadable(err)}") from err
    if not isinstance(envelope, dict) or envelope.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a streamcl checkpoint ({CHECKPOINT_FORMAT})")
    state = envelope["state"]
    digest = content_digest(state)
    if digest != envelope["sha256"]:
        raise ChecksumError(
            f"{path} content does not match its checksum (sha256 {digest[:12]}..., "
            f"written {str(envelope['sha256'])[:12]}...): damaged on disk"
        )
    return state  # type: ignore[no-any-return]


def _unreadable(err: Exception) -> str:
    """Why torch could not load a file, in our words."""
    if isinstance(err, EOFError) or "zip archive" in str(err):
        return "it is empty, truncated or damaged"
    if isinstance(err, pickle.UnpicklingError):
        return "it holds more than tensors and plain containers (such files are never loaded)"
    return f"torch cannot read it ({type(err).__name__})"


def content_digest(state: Any) -> str:
    """SHA-256 over nested containers of tensors and scalars, independent of the file format."""
    digest = hashlib.sha256()
    _feed(digest, state)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}|".encode())
        if tensor.numel():  # an empty tensor is its dtype and shape
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}|".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, list | tuple):
        digest.update(f"L{len(value)}|".encode())
        for item in value:
            _feed(digest, item)
    else:  # str, int, float, bool, None, torch.dtype: repr round-trips exactly
        text = repr(value).encode()
        digest.update(f"S{type(value).__name__}{len(text)}|".encode() + text)


def write_snapshot(
    directory: str | Path, model: nn.Module, version: int, meta: dict[str, Any], keep: int = 3
) -> Path:
    """Write `directory/v<version>/{model.safetensors,meta.json}` atomically; keep the last few."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"v{version:09d}"
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=directory))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(staging / "model.safetensors"))
        (staging / "meta.json").write_text(strictjson.dumps({"version": version, **meta}, indent=2))
        for name in ("model.safetensors", "meta.json"):
            _fsync_path(staging / name)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_path(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # Prune by write order, not version: after a restore to an older checkpoint the
    # newest snapshot may carry a lower version than stale ones from the lost run.
    written = sorted(
        (p for p in directory.glob("v*") if p.is_dir()), key=lambda p: p.stat().st_mtime_ns
    )
    for old in written[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _sequence(path: Path) -> int | None:
    number = path.name[len(CHECKPOINT_PREFIX) : -len(CHECKPOINT_SUFFIX)]
    return int(number) if number.isdigit() else None


def write_atomically(path: Path, write: Any) -> None:
    """Call `write(file)` on a temp file beside `path`, fsync it, rename it over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_path(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
