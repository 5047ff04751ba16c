"""Polled records become arrivals: runs of valid messages decoded together, split at
every rejected one, and `take` cuts them at a message count (no broker needed)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from streamcl.ingest.codec import encode
from streamcl.ingest.kafka import Arrival, decode_records, take
from streamcl.ingest.schema import Batch, Rejected, Sample, StreamSpec

SPEC = StreamSpec((4,), "uint8", 3)


class Record(NamedTuple):
    """The fields of kafka-python's ConsumerRecord that decoding reads."""

    offset: int
    value: bytes | None
    timestamp: int
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


def _valid(offset: int) -> Record:
    sample = Sample(np.full(4, offset, np.uint8), offset % 3, sample_id=offset)
    return Record(offset, encode(sample), 1000 + offset)


def _offsets(arrival: Arrival) -> list[int]:
    item = arrival.item
    if isinstance(item, Batch):
        return [o.offset for o in item.origins if o is not None]
    assert item.origin is not None
    return [item.origin.offset]


def test_valid_runs_are_split_at_each_rejected_message_in_offset_order() -> None:
    garbage = Record(12, b"not a sample", 1012, b"k12", (("h", b"v"),))
    records = [_valid(10), _valid(11), garbage, _valid(13), _valid(14), _valid(15)]
    records.append(Record(16, None, 1016))  # a tombstone
    arrivals = decode_records(records, "t", 3, SPEC, epoch=7)
    assert [_offsets(a) for a in arrivals] == [[10, 11], [12], [13, 14, 15], [16]]
    assert [type(a.item) for a in arrivals] == [Batch, Rejected, Batch, Rejected]
    assert all(a.epoch == 7 for a in arrivals)
    first, bad, run = arrivals[0], arrivals[1], arrivals[2]
    assert first.timestamps_ms == (1010, 1011) and run.timestamps_ms == (1013, 1014, 1015)
    assert isinstance(run.item, Batch)
    assert run.item.labels.tolist() == [13 % 3, 14 % 3, 15 % 3]
    assert run.item.features[:, 0].tolist() == [13, 14, 15]
    # What the dead letter keeps.
    assert (bad.key, bad.headers, bad.timestamps_ms) == (b"k12", [("h", b"v")], (1012,))


def test_a_poll_without_rejects_is_one_run() -> None:
    arrivals = decode_records([_valid(o) for o in range(5)], "t", 0, SPEC, epoch=0)
    assert len(arrivals) == 1 and _offsets(arrivals[0]) == [0, 1, 2, 3, 4]


def test_take_cuts_a_run_where_it_crosses_the_limit_and_keeps_the_rest_in_order() -> None:
    records = [_valid(0), _valid(1), Record(2, b"", 1002), *(_valid(o) for o in range(3, 7))]
    arrivals = decode_records(records, "t", 0, SPEC, epoch=0)
    head, rest = take(arrivals, 4)
    assert [_offsets(a) for a in head] == [[0, 1], [2], [3]]
    assert [_offsets(a) for a in rest] == [[4, 5, 6]]
    assert head[-1].timestamps_ms == (1003,) and rest[0].timestamps_ms == (1004, 1005, 1006)
    assert sum(a.size for a in head) == 4
    everything, nothing = take(arrivals, 100)
    assert everything == arrivals and nothing == []
