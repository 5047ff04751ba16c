"""One learner per checkpoint directory: an exclusive `flock` on `<dir>/.lock`.

Two learners writing one directory would interleave checkpoints of two models and
commit each other's offsets. The kernel drops an flock when its process dies, however
it dies (`kill -9` included), so a crash never leaves a stale lock behind; the pid in
the file is only for the error message.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from streamcl.ingest.errors import ConfigError

LOCK_NAME = ".lock"


class DirectoryInUseError(ConfigError):
    """Another live process holds the checkpoint directory."""


@contextmanager
def checkpoint_lock(directory: Path) -> Iterator[None]:
    """Hold the directory for the duration; raise `DirectoryInUseError` if it is taken."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DirectoryInUseError(
                f"checkpoint directory {directory} is in use by another learner (pid {holder}); "
                "one learner per checkpoint.dir: stop it or use another directory"
            ) from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the flock
