"""The prefetch thread: bounded, in order, and rebalance-safe (a real broker)."""

from __future__ import annotations

import time

from kafka import TopicPartition

from streamcl.deploy.devbroker.tansu import EmbeddedBroker
from streamcl.ingest.kafka import Arrival, KafkaSettings, KafkaSource
from streamcl.ingest.prefetch import Prefetcher
from streamcl.ingest.schema import Batch, StreamSpec
from tests.brokers import FAST_GROUP, memory_broker, unique_topic  # noqa: F401
from tests.service_helpers import digit_payloads, produce, wait_until

DIGITS_SPEC = StreamSpec((8, 8), "uint8", 10)
MESSAGES, MAX_RECORDS, DEPTH = 120, 10, 2


def _source(broker: EmbeddedBroker, topic: str) -> KafkaSource:
    settings = KafkaSettings(broker.bootstrap_servers, consumer=FAST_GROUP)
    source = KafkaSource(settings, topic, f"g-{topic}", DIGITS_SPEC)
    source.start({})
    return source


def _offsets(arrivals: list[Arrival]) -> list[int]:
    """The offsets of the samples learnable from `arrivals` (none is rejected here)."""
    assert all(isinstance(a.item, Batch) for a in arrivals)
    return [o.offset for a in arrivals if isinstance(a.item, Batch) for o in a.item.origins if o]


def test_the_thread_stops_fetching_when_the_queue_is_full_and_keeps_order(
    memory_broker: EmbeddedBroker,  # noqa: F811
) -> None:
    topic = unique_topic("prefetch")
    memory_broker.create_topic(topic)
    produce(memory_broker, topic, digit_payloads(MESSAGES))
    source = _source(memory_broker, topic)
    try:
        with Prefetcher(source, 200, MAX_RECORDS, depth=DEPTH) as feed:
            # DEPTH polls queued plus the one the thread holds while it waits for room.
            ahead = (DEPTH + 1) * MAX_RECORDS
            wait_until(lambda: feed.lag() == {0: MESSAGES - ahead}, 30, "the queue to fill")
            time.sleep(1.0)  # a thread without back-pressure would have fetched it all by now
            assert feed.lag() == {0: MESSAGES - ahead}
            arrivals: list[Arrival] = []
            deadline = time.monotonic() + 30
            while len(_offsets(arrivals)) < MESSAGES and time.monotonic() < deadline:
                arrivals += feed.get(0.5)
        assert _offsets(arrivals) == list(range(MESSAGES))
        with source.ownership:
            assert all(source.current(a) for a in arrivals)
    finally:
        source.close()


def test_a_reassigned_partition_drops_what_was_fetched_ahead_and_resumes_where_handled(
    memory_broker: EmbeddedBroker,  # noqa: F811
) -> None:
    topic = unique_topic("prefetch-rebalance")
    memory_broker.create_topic(topic)
    produce(memory_broker, topic, digit_payloads(MESSAGES))
    source = _source(memory_broker, topic)
    try:
        with Prefetcher(source, 200, MAX_RECORDS, depth=DEPTH) as feed:
            ahead = (DEPTH + 1) * MAX_RECORDS
            wait_until(lambda: feed.lag() == {0: MESSAGES - ahead}, 30, "the queue to fill")
            first = feed.get(5)
            for arrival in first:  # handled: learned or pending in a checkpoint
                assert isinstance(arrival.item, Batch) and arrival.item.origins[-1]
                source.mark_handled(arrival.item.origins[-1])
            # The thread refills the queue and waits: not inside a poll, as during a rebalance.
            behind = MESSAGES - ahead - MAX_RECORDS
            wait_until(lambda: feed.lag() == {0: behind}, 30, "the queue to refill")
            # What the rebalance listener does when the partition comes back to this member.
            source._assigned([TopicPartition(topic, 0)])
            stale = feed.get(5)
            with source.ownership:
                assert stale and not any(source.current(a) for a in stale)
            fresh: list[Arrival] = []
            deadline = time.monotonic() + 30
            while len(_offsets(fresh)) < MESSAGES - MAX_RECORDS and time.monotonic() < deadline:
                fresh += [a for a in feed.get(0.5) if source.current(a)]
        # Nothing skipped, nothing twice: the next current arrival is the first unhandled.
        assert _offsets(first) == list(range(MAX_RECORDS))
        assert _offsets(fresh) == list(range(MAX_RECORDS, MESSAGES))
    finally:
        source.close()
