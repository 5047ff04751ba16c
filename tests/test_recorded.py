"""Recorded stream files: exact read-back, damage confined to its region, atomic writes."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from streamcl.ingest.codec import decode, encode
from streamcl.ingest.errors import DataError
from streamcl.ingest.recorded import CorruptFrame, Frame, StreamReader, StreamWriter
from streamcl.ingest.schema import Sample, StreamSpec

SPEC = StreamSpec((4,), "uint8", 3)
META = {"dataset": "unit", "note": "hand-made"}
FRAME_HEADER = 28  # "SCFR" + u32 length + u32 crc + i64 offset + i64 timestamp


Stream = tuple[Path, list[bytes]]


def payloads() -> list[bytes]:
    # Varied lengths (one empty); none contains the frame marker b"SCFR".
    out = [bytes([i % 251]) * (3 * i + 1) for i in range(7)]
    out.insert(3, b"")
    out.append(encode(Sample(np.array([1, 2, 3, 4], np.uint8), 2, 0, 99, 1234)))
    return out


def offsets(n: int) -> list[int]:
    return [100 + 5 * i for i in range(n)]


def timestamps(n: int) -> list[int]:
    return [1_700_000_000_000 + 10 * i for i in range(n)]


def write_stream(path: Path, items: list[bytes]) -> Path:
    with StreamWriter(path, SPEC, META) as writer:
        for payload, offset, ts in zip(
            items, offsets(len(items)), timestamps(len(items)), strict=True
        ):
            writer.write(payload, offset=offset, timestamp_ms=ts)
    assert writer.frames_written == len(items)
    return path


def frame_positions(path: Path, items: list[bytes]) -> list[int]:
    """Byte offset of each frame, computed from the documented layout."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack_from("<I", raw, 8)
    pos = 8 + 4 + header_len
    out = []
    for payload in items:
        out.append(pos)
        pos += FRAME_HEADER + len(payload)
    assert pos == len(raw)
    return out


def read_all(path: Path) -> list[Frame | CorruptFrame]:
    with StreamReader(path) as reader:
        return list(reader)


def expected_frames(items: list[bytes], keep: list[int]) -> list[Frame]:
    offs, tss = offsets(len(items)), timestamps(len(items))
    return [Frame(offs[i], tss[i], items[i]) for i in keep]


def patch(path: Path, at: int, new: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[at : at + len(new)] = new
    path.write_bytes(bytes(raw))


@pytest.fixture
def stream(tmp_path: Path) -> Stream:
    items = payloads()
    return write_stream(tmp_path / "unit.scs", items), items


# --- exact read-back --------------------------------------------------------------------


def test_frames_read_back_byte_identical_with_offsets_and_timestamps(stream: Stream) -> None:
    path, items = stream
    got = read_all(path)
    assert got == expected_frames(items, list(range(len(items))))
    assert all(isinstance(f, Frame) and type(f.payload) is bytes for f in got)


def test_file_layout_matches_the_documented_format(stream: Stream) -> None:
    path, items = stream
    raw = path.read_bytes()
    assert raw[:8] == b"SCSTREAM"
    (header_len,) = struct.unpack_from("<I", raw, 8)
    assert json.loads(raw[12 : 12 + header_len]) == {"spec": SPEC.to_dict(), **META}
    pos = frame_positions(path, items)[2]
    magic, length, crc, offset, ts = struct.unpack_from("<4sIIqq", raw, pos)
    payload = raw[pos + FRAME_HEADER : pos + FRAME_HEADER + length]
    assert (magic, length, offset, ts, payload) == (b"SCFR", 7, 110, 1_700_000_000_020, items[2])
    # The CRC covers offset, timestamp and payload (not marker, length or itself).
    assert crc == zlib.crc32(struct.pack("<qq", offset, ts) + payload)


def test_header_spec_and_meta_are_exposed(stream: Stream) -> None:
    path, _ = stream
    with StreamReader(path) as reader:
        assert reader.spec == SPEC
        assert reader.header == {"spec": SPEC.to_dict(), **META}
        assert reader.size_bytes == path.stat().st_size


def test_reading_twice_gives_the_same_frames(stream: Stream) -> None:
    path, _ = stream
    with StreamReader(path) as reader:
        assert list(reader) == list(reader)


def test_recorded_samples_decode_against_the_header_spec(stream: Stream) -> None:
    path, _ = stream
    with StreamReader(path) as reader:
        last = list(reader)[-1]
        assert isinstance(last, Frame)
        sample = decode(last.payload, reader.spec)
    assert isinstance(sample, Sample)
    assert (sample.label, sample.task, sample.sample_id) == (2, 0, 99)
    np.testing.assert_array_equal(sample.features, [1, 2, 3, 4])


def test_stream_without_frames_yields_nothing(tmp_path: Path) -> None:
    path = write_stream(tmp_path / "empty.scs", [])
    assert read_all(path) == []


# --- damage -----------------------------------------------------------------------------


@pytest.mark.parametrize("victim", [0, 4, 8])
def test_flipped_payload_byte_costs_exactly_that_frame(stream: Stream, victim: int) -> None:
    path, items = stream
    pos = frame_positions(path, items)[victim]
    at = pos + FRAME_HEADER + len(items[victim]) // 2
    patch(path, at, bytes([path.read_bytes()[at] ^ 0x40]))
    got = read_all(path)
    keep = [i for i in range(len(items)) if i != victim]
    assert [f for f in got if isinstance(f, CorruptFrame)] == [
        CorruptFrame(pos, "checksum mismatch")
    ]
    assert [f for f in got if isinstance(f, Frame)] == expected_frames(items, keep)
    assert got.index(CorruptFrame(pos, "checksum mismatch")) == victim  # still in file order


@pytest.mark.parametrize("field_at", [12, 20], ids=["offset", "timestamp"])
def test_damaged_offset_or_timestamp_fails_the_checksum(stream: Stream, field_at: int) -> None:
    path, items = stream
    pos = frame_positions(path, items)[5]
    patch(path, pos + field_at, b"\xee")
    got = read_all(path)
    assert got[5] == CorruptFrame(pos, "checksum mismatch")
    assert got[:5] + got[6:] == expected_frames(items, [0, 1, 2, 3, 4, 6, 7, 8])


def test_damaged_frame_marker_resyncs_on_the_next_frame(stream: Stream) -> None:
    path, items = stream
    pos = frame_positions(path, items)[4]
    patch(path, pos, b"XXXX")
    got = read_all(path)
    assert got == [
        *expected_frames(items, [0, 1, 2, 3]),
        CorruptFrame(pos, "bad frame marker"),
        *expected_frames(items, [5, 6, 7, 8]),
    ]


def test_length_field_past_the_end_resyncs_on_the_next_frame(stream: Stream) -> None:
    path, items = stream
    pos = frame_positions(path, items)[2]
    patch(path, pos + 4, struct.pack("<I", 10_000_000))
    got = read_all(path)
    assert got[2] == CorruptFrame(pos, "frame claims 10000000 payload bytes, file ends first")
    assert got[:2] + got[3:] == expected_frames(items, [0, 1, 3, 4, 5, 6, 7, 8])


def test_shortened_length_field_resyncs_on_the_next_frame(stream: Stream) -> None:
    path, items = stream
    pos = frame_positions(path, items)[6]
    patch(path, pos + 4, struct.pack("<I", len(items[6]) - 3))
    got = read_all(path)
    assert got[6] == CorruptFrame(pos, "checksum mismatch")
    assert got[:6] + got[7:] == expected_frames(items, [0, 1, 2, 3, 4, 5, 7, 8])


def test_marker_lookalike_inside_a_payload_does_not_lose_later_frames(tmp_path: Path) -> None:
    items = [b"a" * 10, b"xx" + b"SCFR" + b"\xff" * 30, b"b" * 12, b"c" * 5]
    path = write_stream(tmp_path / "lookalike.scs", items)
    pos = frame_positions(path, items)[1]
    patch(path, pos, b"XXXX")
    got = read_all(path)
    assert [f for f in got if isinstance(f, Frame)] == expected_frames(items, [0, 2, 3])
    corrupt = [f for f in got if isinstance(f, CorruptFrame)]
    assert corrupt[0] == CorruptFrame(pos, "bad frame marker")
    assert all(pos <= c.position < frame_positions(path, items)[2] for c in corrupt)


def test_truncated_payload_at_the_tail(stream: Stream) -> None:
    path, items = stream
    pos = frame_positions(path, items)[-1]
    raw = path.read_bytes()
    path.write_bytes(raw[: pos + FRAME_HEADER + 5])
    got = read_all(path)
    assert got == [
        *expected_frames(items, list(range(len(items) - 1))),
        CorruptFrame(pos, f"frame claims {len(items[-1])} payload bytes, file ends first"),
    ]


def test_truncated_frame_header_at_the_tail(stream: Stream) -> None:
    path, items = stream
    pos = frame_positions(path, items)[-1]
    path.write_bytes(path.read_bytes()[: pos + 10])
    got = read_all(path)
    assert got == [
        *expected_frames(items, list(range(len(items) - 1))),
        CorruptFrame(pos, "truncated frame header: 10 bytes left"),
    ]


def test_garbage_after_the_last_frame_is_one_corrupt_region(stream: Stream) -> None:
    path, items = stream
    end = path.stat().st_size
    path.write_bytes(path.read_bytes() + b"\x00" * 64)
    got = read_all(path)
    assert got == [
        *expected_frames(items, list(range(len(items)))),
        CorruptFrame(end, "bad frame marker"),
    ]


# --- not a stream ------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"SCST", b"PK\x03\x04 a zip file, not a stream"])
def test_not_a_stream_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "other.bin"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"other\.bin is not a streamcl stream file .*SCSTREAM"):
        StreamReader(path)


def test_missing_stream_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cannot open stream file .*absent\.scs") as info:
        StreamReader(tmp_path / "absent.scs")
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.parametrize(
    "header",
    [
        b"{not json",
        b"[1, 2]",
        b'"spec"',
        b'{"meta": 1}',
        b'{"spec": {"dtype": "uint8"}}',
        b'{"spec": {"feature_shape": [4], "dtype": "uint8", "num_classes": 1}}',
        b'{"spec": {"feature_shape": [4], "dtype": "int16", "num_classes": 3}}',
    ],
    ids=["syntax", "list", "string", "no-spec", "incomplete-spec", "one-class", "bad-dtype"],
)
def test_unreadable_header(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "bad.scs"
    path.write_bytes(b"SCSTREAM" + struct.pack("<I", len(header)) + header)
    with pytest.raises(DataError, match=r"bad\.scs: unreadable stream header"):
        StreamReader(path)


def test_header_length_beyond_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.scs"
    path.write_bytes(b"SCSTREAM" + struct.pack("<I", 500) + b'{"spec": ')
    with pytest.raises(DataError, match="unreadable stream header"):
        StreamReader(path)


# --- atomic writer -----------------------------------------------------------------------


def test_writer_publishes_only_on_close(tmp_path: Path) -> None:
    path = tmp_path / "out" / "atomic.scs"
    writer = StreamWriter(path, SPEC)
    writer.write(b"abc", offset=0, timestamp_ms=1)
    assert not path.exists()
    writer.close()
    assert path.exists()
    assert read_all(path) == [Frame(0, 1, b"abc")]
    assert sorted(p.name for p in path.parent.iterdir()) == ["atomic.scs"]


def test_writer_context_is_atomic_until_exit(tmp_path: Path) -> None:
    path = tmp_path / "atomic.scs"
    with StreamWriter(path, SPEC) as writer:
        writer.write(b"abc", offset=0, timestamp_ms=1)
        assert not path.exists()
    assert path.exists()


def test_exception_inside_the_writer_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "atomic.scs"
    with pytest.raises(RuntimeError, match="producer died"), StreamWriter(path, SPEC) as writer:
        writer.write(b"abc", offset=0, timestamp_ms=1)
        raise RuntimeError("producer died")
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_previous_file(tmp_path: Path) -> None:
    path = write_stream(tmp_path / "kept.scs", [b"old"])
    with pytest.raises(RuntimeError), StreamWriter(path, SPEC) as writer:
        writer.write(b"new", offset=0, timestamp_ms=0)
        raise RuntimeError("abort")
    assert read_all(path) == expected_frames([b"old"], [0])
    assert [p.name for p in tmp_path.iterdir()] == ["kept.scs"]


def test_abort_removes_the_temp_file(tmp_path: Path) -> None:
    writer = StreamWriter(tmp_path / "x.scs", SPEC)
    writer.write(b"abc", offset=0, timestamp_ms=1)
    writer.abort()
    assert list(tmp_path.iterdir()) == []
