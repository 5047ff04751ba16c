"""Recorded stream files: framed wire messages with their original offsets and times.

Layout::

    b"SCSTREAM" | u32 header length | header JSON (stream spec and provenance)
    frames:  b"SCFR" | u32 payload length | u32 crc32 | i64 offset | i64 timestamp_ms | payload

The CRC covers the bytes from offset through the end of the payload. A reader that meets a bad frame
reports it (`CorruptFrame`) and resynchronises on the next frame marker, so one
damaged region costs the frames in it and nothing else.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final, NamedTuple

from streamcl.ingest.errors import ConfigError, DataError
from streamcl.ingest.schema import StreamSpec

FILE_MAGIC: Final = b"SCSTREAM"
FRAME_MAGIC: Final = b"SCFR"
_LEN = struct.Struct("<I")
_FRAME = struct.Struct("<4sIIqq")
_COORDS = struct.Struct("<qq")


class Frame(NamedTuple):
    """One recorded message: its payload bytes exactly as they were on the wire.

    A NamedTuple, not a dataclass: one is built per message on the hot path.
    """

    offset: int
    timestamp_ms: int
    payload: bytes


@dataclass(frozen=True)
class CorruptFrame:
    """A damaged region of the file, skipped; `position` is its byte offset in the file.

    `size` is how many bytes were skipped; it is left out of equality, since a region is
    identified by where it starts and why.
    """

    position: int
    detail: str
    size: int = field(default=0, compare=False)


@dataclass
class StreamTally:
    """What one pass over a stream file found: frames read and damaged regions.

    A stream is intact when nothing was damaged and it holds as many frames as its
    header announces (`num_messages`, when the writer knew it).
    """

    file_size: int
    expected: int | None
    frames: int = 0
    damaged: list[CorruptFrame] = field(default_factory=list)

    def count(self, item: Frame | CorruptFrame) -> None:
        if isinstance(item, CorruptFrame):
            self.damaged.append(item)
        else:
            self.frames += 1

    @property
    def damaged_bytes(self) -> int:
        return sum(region.size for region in self.damaged)

    @property
    def ends_in_damage(self) -> bool:
        """The last damaged region runs to the end of the file: it looks truncated."""
        last = self.damaged[-1] if self.damaged else None
        return last is not None and last.position + last.size >= self.file_size

    def problem(self) -> str | None:
        """One line saying what is wrong with the stream, or None when it is intact."""
        parts = []
        if self.damaged:
            first = self.damaged[0]
            parts.append(
                f"{len(self.damaged)} damaged region(s), {self.damaged_bytes} bytes skipped "
                f"(first at byte {first.position}: {first.detail})"
            )
        if self.ends_in_damage:
            parts.append("it ends inside a damaged frame (truncated?)")
        if self.expected is not None and self.frames < self.expected:
            parts.append(f"{self.frames} of the {self.expected} frames its header announces read")
        return "; ".join(parts) or None

    def to_dict(self) -> dict[str, Any]:
        return {
            "frames_read": self.frames,
            "frames_expected": self.expected,
            "damaged_bytes": self.damaged_bytes,
            "damaged_regions": [
                {"position": r.position, "bytes": r.size, "detail": r.detail} for r in self.damaged
            ],
            "problem": self.problem(),
        }


def _crc(offset: int, timestamp_ms: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(_COORDS.pack(offset, timestamp_ms)))


_CRC_START = _FRAME.size - _COORDS.size
"""Offset and timestamp sit last in the frame header, so the CRC region is contiguous."""


class StreamWriter:
    """Write a recorded stream atomically: frames go to a temp file renamed on `close`."""

    def __init__(self, path: str | Path, spec: StreamSpec, meta: dict[str, Any] | None = None):
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = json.dumps({"spec": spec.to_dict(), **(meta or {})}).encode()
        self._file: BinaryIO = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(FILE_MAGIC + _LEN.pack(len(header)) + header)
        self.frames_written = 0

    def write(self, payload: bytes, offset: int, timestamp_ms: int) -> None:
        frame = _FRAME.pack(
            FRAME_MAGIC, len(payload), _crc(offset, timestamp_ms, payload), offset, timestamp_ms
        )
        self._file.write(frame)
        self._file.write(payload)
        self.frames_written += 1

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class StreamReader:
    """Read a recorded stream; iterate it for `Frame`s and `CorruptFrame`s in file order."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        except OSError as err:
            raise DataError(f"cannot open stream file {self.path}: {err}") from err
        head = self._file.read(len(FILE_MAGIC) + _LEN.size)
        if len(head) < len(FILE_MAGIC) + _LEN.size or not head.startswith(FILE_MAGIC):
            self._file.close()
            raise DataError(f"{self.path} is not a streamcl stream file (no {FILE_MAGIC!r} magic)")
        (header_len,) = _LEN.unpack_from(head, len(FILE_MAGIC))
        try:
            self.header: dict[str, Any] = json.loads(self._file.read(header_len))
            self.spec = StreamSpec.from_dict(self.header["spec"])
        except (ValueError, KeyError, TypeError, ConfigError) as err:
            self._file.close()
            raise DataError(f"{self.path}: unreadable stream header: {err}") from err
        self._data_start = len(FILE_MAGIC) + _LEN.size + header_len

    @property
    def size_bytes(self) -> int:
        return os.fstat(self._file.fileno()).st_size

    def tally(self) -> StreamTally:
        """An empty tally for a pass over this file, expecting the header's frame count."""
        expected = self.header.get("num_messages")
        return StreamTally(self.size_bytes, expected if isinstance(expected, int) else None)

    def __iter__(self) -> Iterator[Frame | CorruptFrame]:
        size = self.size_bytes
        if size <= self._data_start:
            return
        with mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) as view:
            yield from _frames(view, self._data_start, size)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> StreamReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _frames(view: mmap.mmap, pos: int, size: int) -> Iterator[Frame | CorruptFrame]:
    memory = memoryview(view)
    try:
        yield from _scan(view, memory, pos, size)
    finally:
        memory.release()  # the mmap cannot close while a view is exported


def _scan(
    view: mmap.mmap, memory: memoryview, pos: int, size: int
) -> Iterator[Frame | CorruptFrame]:
    while pos < size:
        if size - pos < _FRAME.size:
            yield CorruptFrame(pos, f"truncated frame header: {size - pos} bytes left", size - pos)
            return
        magic, length, crc, offset, timestamp = _FRAME.unpack_from(view, pos)
        problem = ""
        if magic != FRAME_MAGIC:
            problem = "bad frame marker"
        elif pos + _FRAME.size + length > size:
            problem = f"frame claims {length} payload bytes, file ends first"
        else:
            start = pos + _FRAME.size
            if zlib.crc32(memory[pos + _CRC_START : start + length]) == crc:
                yield Frame(offset, timestamp, view[start : start + length])
                pos = start + length
                continue
            problem = "checksum mismatch"
            # The length field was plausible: if the next frame starts right after,
            # only this frame's bytes were damaged.
            end = start + length
            if end == size or view[end : end + len(FRAME_MAGIC)] == FRAME_MAGIC:
                yield CorruptFrame(pos, problem, end - pos)
                pos = end
                continue
        next_pos = view.find(FRAME_MAGIC, pos + 1)
        yield CorruptFrame(pos, problem, (size if next_pos < 0 else next_pos) - pos)
        if next_pos < 0:
            return
        pos = next_pos
