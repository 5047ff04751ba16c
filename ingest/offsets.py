"""Resume offsets against the topic: each partition's log start and end, the group's commits.

A checkpoint's offsets can stop fitting the topic: it was deleted and recreated (the
offset lies past the new end), or retention moved the log start past it. Apache Kafka
then resets the position silently (`auto_offset_reset`); Tansu answers empty fetches
and the consumer waits at the old offset. Either way messages are skipped or learned
again without a word. `read_topic_state` reads the facts before the consumer starts;
`apply_policy` decides what happens to each partition outside its log.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Literal

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from streamcl.ingest.errors import StreamclError
from streamcl.ingest.kafka import KafkaSettings, KafkaSourceError, Offsets

log = logging.getLogger(__name__)

OutOfRange = Literal["before_start", "past_end"]
OUT_OF_RANGE: tuple[OutOfRange, ...] = ("before_start", "past_end")
Policy = Literal["refuse", "earliest", "latest"]


class OffsetOutOfRangeError(StreamclError):
    """A resume offset lies outside its partition's log and the policy is to refuse."""


@dataclass(frozen=True)
class LogBounds:
    """Offsets a partition holds: `start` is the first, `end` the next one to be written.

    `end` is None when it could not be read (no fetch answered in time).
    """

    start: int
    end: int | None


@dataclass(frozen=True)
class TopicState:
    """Per (topic, partition): log bounds, and the group's committed offset where it has one."""

    bounds: dict[tuple[str, int], LogBounds]
    committed: Offsets


@dataclass(frozen=True)
class Reset:
    """A resume offset found outside its partition's log, and where the policy moved it."""

    topic: str
    partition: int
    reason: OutOfRange
    offset: int
    log_start: int
    log_end: int
    policy: Policy
    new_offset: int

    @property
    def messages_gone(self) -> int:
        """Messages deleted (retention) before this model learned them."""
        return self.log_start - self.offset if self.reason == "before_start" else 0

    @property
    def messages_skipped(self) -> int:
        """Messages still in the log that this model will never learn (policy latest)."""
        return self.new_offset - self.log_start

    def as_dict(self) -> dict[str, object]:
        return {
            **asdict(self),
            "messages_gone": self.messages_gone,
            "messages_skipped": self.messages_skipped,
        }


def out_of_range(offset: int, bounds: LogBounds) -> OutOfRange | None:
    """Where `offset` lies outside the log, or None when the consumer can resume there.

    `end` itself is in range: it is where the next message will be written.
    """
    if offset < bounds.start:
        return "before_start"
    if bounds.end is not None and offset > bounds.end:
        return "past_end"
    return None


def apply_policy(
    resume: Offsets, state: TopicState, policy: Policy, origin: str
) -> tuple[Offsets, list[Reset]]:
    """Resume offsets with those outside their log reset by `policy`, and the resets.

    `refuse` raises `OffsetOutOfRangeError` naming every such partition and its offsets;
    `earliest` moves them to the log start, `latest` to its end. Partitions the topic
    no longer has are left as they are (the group will not assign them).
    """
    offsets = dict(resume)
    resets: list[Reset] = []
    for (topic, partition), offset in sorted(resume.items()):
        bounds = state.bounds.get((topic, partition))
        reason = None if bounds is None else out_of_range(offset, bounds)
        if bounds is None or reason is None:
            continue
        end = bounds.end if bounds.end is not None else bounds.start
        new_offset = bounds.start if policy == "earliest" else end
        resets.append(
            Reset(topic, partition, reason, offset, bounds.start, end, policy, new_offset)
        )
        offsets[(topic, partition)] = new_offset
    if resets and policy == "refuse":
        where = "; ".join(
            f"partition {r.topic}/{r.partition}: offset {r.offset} is "
            f"{'before the log start' if r.reason == 'before_start' else 'past the log end'} "
            f"(log holds {r.log_start}..{r.log_end})"
            for r in resets
        )
        raise OffsetOutOfRangeError(
            f"resume offsets {origin} do not fit the topic: {where}; the topic was recreated "
            f"or truncated. Set resume.out_of_range to earliest or latest to reset, or use "
            f"another checkpoint.dir"
        )
    return offsets, resets


def read_topic_state(
    settings: KafkaSettings, topic: str, group_id: str, timeout_s: float
) -> TopicState:
    """Each partition's log bounds and `group_id`'s committed offsets, without joining it.

    The end is the larger of ListOffsets' answer and a fetch's high-water mark: Tansu's
    ListOffsets (`end_offsets`) answers the last batch's base offset + 1, below the end.
    A topic that does not exist yet has no partitions: nothing to check.
    """
    consumer = _consumer(settings, group_id)
    try:
        numbers = sorted(consumer.partitions_for_topic(topic))
        partitions = [TopicPartition(topic, p) for p in numbers]
        if not partitions:
            return TopicState({}, {})
        starts = consumer.beginning_offsets(partitions)
        listed = consumer.end_offsets(partitions)
        committed = {}
        for tp in partitions:
            offset = consumer.committed(tp)
            if offset is not None:
                committed[(tp.topic, tp.partition)] = offset
        highwater = _highwaters(consumer, partitions, timeout_s)
        bounds = {}
        for tp in partitions:
            end = highwater.get(tp)
            if end is None:
                log.warning(
                    "log end unknown: no fetch answered in %.1f s partition=%s/%d",
                    timeout_s,
                    tp.topic,
                    tp.partition,
                )
            bounds[(tp.topic, tp.partition)] = LogBounds(
                starts[tp], None if end is None else max(end, listed[tp])
            )
        return TopicState(bounds, committed)
    except KafkaError as err:
        raise KafkaSourceError(f"cannot read the offsets of topic {topic!r}: {err}") from err
    finally:
        consumer.close(autocommit=False)


def _consumer(settings: KafkaSettings, group_id: str) -> KafkaConsumer:
    try:
        return KafkaConsumer(
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **settings.common(),
            **settings.consumer,
        )
    except KafkaError as err:
        raise KafkaSourceError(
            f"cannot connect consumer to {settings.bootstrap_servers}: {err}"
        ) from err


def _highwaters(
    consumer: KafkaConsumer, partitions: list[TopicPartition], timeout_s: float
) -> dict[TopicPartition, int]:
    """High-water marks from fetches at each log start (assigned, never subscribed)."""
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    deadline = time.monotonic() + timeout_s
    found: dict[TopicPartition, int] = {}
    while len(found) < len(partitions) and time.monotonic() < deadline:
        consumer.poll(timeout_ms=100, max_records=1)
        for tp in partitions:
            highwater = consumer.highwater(tp)
            if highwater is not None:
                found[tp] = highwater
    return found
