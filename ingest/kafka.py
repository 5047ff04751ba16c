"""Kafka source and sinks (kafka-python): the production path into and out of streamcl.

Delivery contract (DESIGN.md): offsets are never auto-committed. The caller commits
only offsets that a durable checkpoint already holds; on (re)assignment the source
seeks each partition to the offset the model has handled (the checkpoint's after a
restart), so the model state matches a prefix of each partition: nothing skipped,
re-learning bounded by one checkpoint interval.

Rebalances (tested with kafka-python 3.0.x, whose IO thread runs rebalance listeners):
before partitions are taken away the caller's `on_revoke` checkpoint runs in a worker
thread while the listener awaits it, so heartbeats go on and no blocking call is made
on the IO thread; the revoked partitions' offsets are then committed with the async
commit the listener awaits, before anyone else may fetch them. Partitions lost to an
eviction (a poll gap over `max_poll_interval_ms`) are not committed: the next poll
rejoins, and the partitions given back are sought to the model's own offsets.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from kafka.errors import CorruptRecordError, KafkaError, UnsupportedCodecError
from kafka.future import Future
from kafka.structs import OffsetAndMetadata

from streamcl.ingest.codec import decode_many
from streamcl.ingest.errors import StreamclError
from streamcl.ingest.schema import Batch, Origin, Rejected, StreamSpec

log = logging.getLogger(__name__)

Offsets = dict[tuple[str, int], int]
"""(topic, partition) -> next offset to consume."""

DEAD_LETTER_SUFFIX = ".dlq"
QUARANTINE_SUFFIX = ".quarantine"
"""Suspect-label samples go to `<topic>.quarantine` (a `DeadLetterSink` with other reasons)."""
MAX_DEAD_LETTER_PAYLOAD = 900 * 1024
"""Payloads above this go to the dead-letter topic truncated (with their original size
in a header), so a broker's message-size limit can never stall the service."""
SIDE_TOPIC_BATCHING = {"linger_ms": 50, "batch_size": 512 * 1024}
"""Producer batching for the dead-letter and quarantine topics: kafka-python's defaults
(send at once, 16 KiB batches) build one produce request per message or two, in Python,
on a thread that shares the GIL with the learner. Nothing waits on the 50 ms: `flush`
sends at once and precedes every offset commit."""


Rebalance = Literal["cooperative", "eager"]
ASSIGNORS: dict[str, tuple[type, ...]] = {
    # KIP-429: a join or leave moves only the partitions that change owner; every
    # member of the group must offer it.
    "cooperative": (CooperativeStickyAssignor,),
    # kafka-python's default: every rebalance revokes all partitions of every member.
    "eager": (RangePartitionAssignor, RoundRobinPartitionAssignor),
}
TOMBSTONE = "tombstone"
"""Reject reason of a null value (`streamcl.ingest.codec.decode`)."""
UNREADABLE = "unreadable_batch"
"""Reject reason of offsets the client could not decode (missing codec, corrupt batch)."""
OnUnreadable = Literal["skip", "stop"]
PROBE_TIMEOUT_S = 5.0
"""How long one probe poll may wait for a fetch while locating an unreadable batch."""
REJOIN_WAIT_S = 15.0
"""How long one `poll_group` call keeps polling while its group (re)join is under way."""
REJOIN_POLL_MS = 100
"""The shortest poll while a join is under way: a caller's timeout 0 must not spin."""


class KafkaSourceError(StreamclError):
    """The Kafka client could not be created or used."""


class UnreadableBatchError(KafkaSourceError):
    """A record batch the client cannot decode, and `on_unreadable` is `stop`."""


@dataclass(frozen=True)
class KafkaSettings:
    """Client settings shared by consumers and producers, passed through to kafka-python.

    `consumer` / `producer` hold any further kafka-python settings (fetch sizes,
    timeouts, acks, ...), applied last.
    """

    bootstrap_servers: str
    client_id: str = "streamcl"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = None
    consumer: dict[str, Any] = field(default_factory=dict)
    producer: dict[str, Any] = field(default_factory=dict)

    def common(self) -> dict[str, Any]:
        keys = (
            "bootstrap_servers",
            "client_id",
            "security_protocol",
            "sasl_mechanism",
            "sasl_plain_username",
            "sasl_plain_password",
            "ssl_cafile",
            "ssl_certfile",
            "ssl_keyfile",
            "ssl_password",
        )
        values = {k: getattr(self, k) for k in keys}
        values["bootstrap_servers"] = [s.strip() for s in self.bootstrap_servers.split(",")]
        return {k: v for k, v in values.items() if v is not None}


Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Arrival:
    """Messages of one partition as fetched, in offset order: a run of valid ones decoded
    together into one `Batch` (`origins` per row), or one message that failed decoding
    (`Rejected`) with the key and headers its dead letter keeps. timestamps_ms: Kafka's,
    per message (ms since epoch, -1 when none); epoch: the partition's ownership epoch
    when the messages were fetched (`KafkaSource.current`)."""

    item: Batch | Rejected
    timestamps_ms: tuple[int, ...]
    key: bytes | None = None
    headers: Headers = field(default_factory=list)
    epoch: int = 0

    @property
    def origin(self) -> Origin | None:
        """Where the first message came from."""
        item = self.item
        if isinstance(item, Batch):
            return item.origins[0] if item.origins else None
        return item.origin

    @property
    def size(self) -> int:
        """Messages in the arrival (an unreadable range counts as one)."""
        return len(self.item) if isinstance(self.item, Batch) else 1

    def split(self, rows: int) -> tuple[Arrival, Arrival]:
        """The first `rows` messages of a run and the rest."""
        assert isinstance(self.item, Batch) and 0 < rows < len(self.item)
        batch, times = self.item, self.timestamps_ms
        return (
            Arrival(batch.rows(0, rows), times[:rows], epoch=self.epoch),
            Arrival(batch.rows(rows, len(batch)), times[rows:], epoch=self.epoch),
        )


def take(arrivals: list[Arrival], limit: int) -> tuple[list[Arrival], list[Arrival]]:
    """The first `limit` messages of `arrivals` (a run split where it crosses the limit)
    and the rest, in order."""
    taken: list[Arrival] = []
    count = 0
    for i, arrival in enumerate(arrivals):
        if count >= limit:
            return taken, arrivals[i:]
        if count + arrival.size > limit:
            head, tail = arrival.split(limit - count)
            return [*taken, head], [tail, *arrivals[i + 1 :]]
        taken.append(arrival)
        count += arrival.size
    return taken, []


def decode_records(
    records: list[Any], topic: str, partition: int, spec: StreamSpec, epoch: int
) -> list[Arrival]:
    """One partition's polled records as arrivals in offset order: valid messages decoded
    together (`decode_many`), one run between any two rejected ones."""
    origins = [Origin(topic, partition, r.offset) for r in records]
    batch, rejects = decode_many([r.value for r in records], spec, origins)
    if not rejects:
        assert batch is not None  # a poll never returns a partition without records
        return [Arrival(batch, tuple(r.timestamp for r in records), epoch=epoch)]
    rejected_at = {r.origin.offset: r for r in rejects if r.origin is not None}
    arrivals: list[Arrival] = []
    times: list[int] = []  # of the valid rows since the last rejected one
    run_start = row = 0  # `batch` rows
    for record in records:
        rejected = rejected_at.get(record.offset)
        if rejected is None:
            times.append(record.timestamp)
            row += 1
            continue
        if batch is not None and row > run_start:
            arrivals.append(Arrival(batch.rows(run_start, row), tuple(times), epoch=epoch))
            times, run_start = [], row
        headers = list(record.headers or [])
        arrivals.append(Arrival(rejected, (record.timestamp,), record.key, headers, epoch))
    if batch is not None and row > run_start:
        arrivals.append(Arrival(batch.rows(run_start, row), tuple(times), epoch=epoch))
    return arrivals


class KafkaSource:
    """Consume a topic in a consumer group; decode and validate every message.

    on_revoke: called (in a worker thread, while the consumer waits in `poll`) before
    partitions are taken away, so the caller can checkpoint and commit what it has
    learned from them; its `commit` calls then cover the partitions being revoked.
    rebalance: the group protocol every member must share (`ASSIGNORS`).
    on_unreadable: what to do with offsets the client cannot decode (a batch of a codec
    it lacks, a corrupt batch). `skip`: one `Rejected` (reason `unreadable_batch`) covering
    the offset range is returned and the partition is sought past it; `stop`: raise
    `UnreadableBatchError` naming the partition and offsets. Either way the same batch can
    never crash the service again and again.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        topic: str,
        group_id: str,
        spec: StreamSpec,
        on_revoke: Callable[[], object] | None = None,
        rebalance: Rebalance = "cooperative",
        on_unreadable: OnUnreadable = "skip",
    ):
        self.topic = topic
        self.spec = spec
        self.on_unreadable = on_unreadable
        # Next offset per partition whose message the caller has fully handled (learned,
        # pending in its state, or dead-lettered): what a checkpoint may claim, and where
        # a partition given back to this member resumes.
        self.handled: Offsets = {}
        self._on_revoke = on_revoke
        # Bumped whenever a partition is revoked, lost or (re)assigned: an arrival fetched
        # in an older epoch is not this member's to handle any more (`current`).
        self._epochs: dict[int, int] = {}
        self.ownership = threading.Lock()
        """Held by the caller while it handles one arrival, and by a revocation while it
        retires the revoked partitions' epochs: so no arrival of a revoked partition is
        handled after the checkpoint that gives the partition away."""
        self._revoking: set[TopicPartition] = set()
        # Set while a revocation's worker runs: its commit is deferred to the listener.
        self._revocation: _Revocation | None = None
        config = {
            "group_id": group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "partition_assignment_strategy": ASSIGNORS[rebalance],
            **settings.common(),
            **settings.consumer,
        }
        # Outside the group: it only locates a batch the group consumer cannot decode.
        self._probe_config = {**config, "group_id": None}
        try:
            self._consumer = KafkaConsumer(**config)
        except KafkaError as err:
            raise KafkaSourceError(
                f"cannot connect consumer to {settings.bootstrap_servers}: {err}"
            ) from err

    def start(self, resume: Offsets) -> None:
        """Subscribe; partitions we hold a checkpoint for are sought to its offsets."""
        self.handled = dict(resume)
        self._consumer.subscribe([self.topic], listener=_Listener(self))

    def assign(self, resume: Offsets, partitions: list[int]) -> None:
        """Own `partitions` outright, outside the group protocol, so no rebalance can move
        them (the scale-out ranks split a topic's partitions by rank). Commits still go to
        the group, as a member-less consumer's; a partition without a checkpoint offset
        starts at the group's committed one."""
        self.handled = dict(resume)
        owned = [TopicPartition(self.topic, p) for p in partitions]
        self._consumer.assign(owned)
        self._assigned(owned)

    def wait_partition_count(self, timeout_s: float) -> int:
        """The topic's partition count once its metadata is known; a clear error if never."""
        return len(_wait_for_partitions(self._consumer, self.topic, timeout_s))

    def poll(self, timeout_ms: int, max_records: int) -> list[Arrival]:
        """Fetch, decode and validate up to `max_records` messages, in partition order;
        no per-message object but for the rejected ones."""
        try:
            batches = poll_group(self._consumer, timeout_ms, max_records)
        except Exception as err:
            if not _maybe_unreadable(err):
                raise
            return [self._unreadable(err)]
        arrivals = []
        for tp, records in batches.items():
            # Read after the poll: rebalances run inside it, so these are the records'.
            epoch = self._epochs.get(tp.partition, 0)
            arrivals += decode_records(records, tp.topic, tp.partition, self.spec, epoch)
        return arrivals

    def current(self, arrival: Arrival) -> bool:
        """Whether `arrival` was fetched since its partition was last (re)assigned or taken
        away: an older one belongs to another member now, or is fetched again from the
        offset this member has handled. Call it holding `ownership`."""
        origin = arrival.origin
        return origin is None or self._epochs.get(origin.partition, 0) == arrival.epoch

    def _retire(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self._epochs[tp.partition] = self._epochs.get(tp.partition, 0) + 1

    def _unreadable(self, err: Exception) -> Arrival:
        """Find the partition and offsets that `err` came from; skip them or stop.

        The client's error names neither, so a separate consumer outside the group probes
        each partition with unread messages at the group consumer's position, one partition
        at a time; the first that fails again is the one. Its end is found by probing one
        offset further at a time: a fetch returns the whole batch holding the offset, so
        this never passes over a readable message (at the cost of one fetch per unreadable
        offset). An error no probe reproduces is not a bad batch: it is raised as it was.
        (Probing with the group consumer itself, by pausing partitions, leaves kafka-python
        3.0 starving a paused partition forever.)
        """
        consumer = self._consumer
        probe = KafkaConsumer(**self._probe_config)
        try:
            for tp in sorted(consumer.assignment(), key=lambda tp: tp.partition):
                first = consumer.position(tp)
                highwater = consumer.highwater(tp)
                if highwater is not None and first >= highwater:
                    continue
                probe.assign([tp])
                if not _fails(probe, tp, first):
                    continue
                end = first + 1
                highwater = highwater if highwater is not None else probe.highwater(tp)
                while highwater is not None and end < highwater and _fails(probe, tp, end):
                    end += 1
                return self._found(tp, first, end - 1, err)
        finally:
            probe.close(autocommit=False)
        raise err

    def _found(self, tp: TopicPartition, first: int, last: int, err: Exception) -> Arrival:
        where = f"topic {tp.topic} partition {tp.partition} offsets {first}-{last}"
        error = str(err)  # kafka-python's errors start with their class name; others don't
        if not error.startswith(type(err).__name__):
            error = f"{type(err).__name__}: {error}"
        if self.on_unreadable == "stop":
            raise UnreadableBatchError(
                f"cannot decode the record batch at {where} ({error}); to dead-letter and "
                f"skip it, restart with kafka.on_unreadable: skip"
            ) from err
        log.error("unreadable record batch at %s: dead-lettered and skipped error=%s", where, error)
        self._consumer.seek(tp, last + 1)
        origin = Origin(tp.topic, tp.partition, first)
        rejected = Rejected(b"", UNREADABLE, error[:1024], origin, last_offset=last)
        return Arrival(rejected, (-1,), epoch=self._epochs.get(tp.partition, 0))

    def mark_handled(self, origin: Origin, last_offset: int | None = None) -> None:
        """Record that the message at `origin` (through `last_offset`, for a range) is
        accounted for; checkpoints may include it."""
        last = origin.offset if last_offset is None else last_offset
        self.handled[(origin.topic, origin.partition)] = last + 1

    def commit(self, offsets: Offsets) -> bool:
        """Commit offsets (already durable in a checkpoint); False if the broker refused.

        Only partitions this member holds (or is giving up right now) are committed.
        """
        owned = self._consumer.assignment() | self._revoking
        to_commit = {
            TopicPartition(topic, partition): OffsetAndMetadata(offset, "", -1)
            for (topic, partition), offset in offsets.items()
            if TopicPartition(topic, partition) in owned
        }
        if not to_commit:
            return True
        revocation = self._revocation
        if revocation is not None and threading.current_thread() is revocation.worker:
            revocation.offsets = to_commit  # the listener commits them on the IO thread
            return True
        try:
            self._consumer.commit(to_commit)
        except KafkaError as err:
            # The checkpoint holds these offsets: a later commit, or the seek on restart,
            # still resumes correctly.
            log.warning("offset commit failed, will retry at the next checkpoint error=%s", err)
            return False
        return True

    def committed(self) -> Offsets:
        out = {}
        for tp in self._consumer.assignment():
            offset = self._consumer.committed(tp)
            if offset is not None:
                out[(tp.topic, tp.partition)] = offset
        return out

    def lag(self) -> dict[int, int]:
        """Per-partition lag = highwater - position (not end_offsets(): see DESIGN.md).

        Negative when the position is past the log's end (topic recreated or truncated):
        never clamped to 0, which would show a healthy consumer that learns nothing.
        """
        out = {}
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue
            position = self._consumer.position(tp)
            out[tp.partition] = highwater - position
        return out

    def assignment(self) -> list[int]:
        return sorted(tp.partition for tp in self._consumer.assignment())

    def partition_count(self) -> int:
        """Partitions of the topic according to the cluster's metadata (0: unknown yet)."""
        return len(self._consumer.partitions_for_topic(self.topic) or ())

    def rewind(self, arrivals: list[Arrival]) -> None:
        """Seek back to the first of `arrivals` on each partition: as if never polled."""
        first: dict[int, int] = {}
        for arrival in arrivals:
            origin = arrival.origin
            if origin is not None:
                first[origin.partition] = min(
                    first.get(origin.partition, origin.offset), origin.offset
                )
        assigned = {tp.partition: tp for tp in self._consumer.assignment()}
        for partition, offset in first.items():
            if partition in assigned:
                self._consumer.seek(assigned[partition], offset)

    def close(self) -> None:
        """Leave the group; the caller has already checkpointed and committed."""
        self._on_revoke = None  # closing revokes everything: nothing left to save
        self._consumer.close(autocommit=False)

    def _assigned(self, partitions: Iterable[TopicPartition]) -> None:
        """Seek to the model's own offsets: after a restart, a rebalance or an eviction.

        Partitions this model has never read start at the group's committed offset.
        """
        self._retire(partitions)  # anything fetched before is fetched again from here
        for tp in partitions:
            offset = self.handled.get((tp.topic, tp.partition))
            if offset is not None:
                self._consumer.seek(tp, offset)
                log.info("resuming partition=%d offset=%d learned up to", tp.partition, offset)

    async def _revoked(self, partitions: set[TopicPartition]) -> None:
        """Checkpoint in a worker thread, then commit asynchronously; never raises.

        Runs on kafka-python's IO thread, which must stay free for heartbeats and the
        commit; the thread that polls is blocked in `poll` meanwhile, but a learner fed
        by a prefetch thread may be mid-batch: `on_revoke` takes the caller's model lock,
        and the worker first retires the partitions under `ownership`, so arrivals of
        theirs fetched ahead are dropped, never handled after the checkpoint. A failure
        is logged: the next owner then re-reads from the previous commit, at most one
        checkpoint interval.
        """
        if self._on_revoke is None or not partitions:
            self._retire(partitions)
            return
        log.info("partitions revoked partitions=%s: checkpointing", _numbers(partitions))
        on_revoke = self._on_revoke

        def retire_then_checkpoint() -> object:
            # Arrivals of these partitions fetched ahead are dropped from now on; the
            # checkpoint then covers exactly what was handled of them.
            with self.ownership:
                self._retire(partitions)
            return on_revoke()

        revocation = _Revocation(retire_then_checkpoint, self._consumer)
        self._revoking = set(partitions)
        self._revocation = revocation
        try:
            await revocation.start()
        except Exception as err:  # a failed commit must not stop the service
            log.warning("offsets of revoked partitions not committed error=%s", err)
        finally:
            self._revocation = None
            self._revoking = set()


class _Revocation:
    """One revocation checkpoint, run in a worker thread and awaited on the IO loop."""

    def __init__(self, checkpoint: Callable[[], object], consumer: KafkaConsumer):
        self._checkpoint = checkpoint
        self._consumer = consumer
        self.offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        self.worker = threading.Thread(target=self._run, name="streamcl-revoke", daemon=True)
        self._done = Future()

    def start(self) -> Future:
        self.worker.start()
        return self._done

    def _run(self) -> None:
        try:
            self._checkpoint()
        except Exception:
            log.exception("checkpoint before revocation failed")
        # commit_async schedules the commit on the IO loop (thread-safe) and resolves its
        # future there, so the awaiting listener resumes at once; with nothing durable to
        # commit it is a no-op that still resumes it.
        self._consumer.commit_async(self.offsets).chain(self._done)


def _fails(probe: KafkaConsumer, tp: TopicPartition, offset: int) -> bool:
    """Whether `probe` (assigned `tp`) fetching at `offset` raises a decode error.

    kafka-python 3.0 keeps a partition's records whose decoding failed buffered at the
    failing offset, and a poll from that same position spins on them forever: so every
    probe is at a higher offset than the last, and the group consumer is sought away from
    the failing offset (skip) or closed (stop), never polled there again.
    """
    probe.seek(tp, offset)
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if probe.poll(timeout_ms=200, max_records=1):
                return False
        except Exception as err:
            if _maybe_unreadable(err):
                return True
            raise
    return False


def poll_group(
    consumer: KafkaConsumer, timeout_ms: int, max_records: int | None = None
) -> dict[TopicPartition, list[Any]]:
    """`consumer.poll`, repeated back to back while the consumer's group (re)join runs.

    kafka-python 3.0.12 keeps the JoinGroup -> SyncGroup round trip as a task across
    polls, but when that task completes while no poll is waiting for it (the caller is
    between polls) the next poll discards its result and joins again. A broker that holds
    JoinGroup for a fixed delay (Tansu: about 1 s) then phase-locks a caller that polls
    in short slices with work in between into rejoining forever. Polling again at once
    until the join is through leaves no gap for the result to fall into; the wait is
    bounded so a caller that must stop (or step a collective) is not held longer.
    """
    deadline = time.monotonic() + REJOIN_WAIT_S
    batches = consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
    while not batches and _rejoining(consumer) and time.monotonic() < deadline:
        slice_ms = max(timeout_ms, REJOIN_POLL_MS)
        batches = consumer.poll(timeout_ms=slice_ms, max_records=max_records)
    return batches


def _rejoining(consumer: KafkaConsumer) -> bool:
    coordinator = consumer._coordinator  # no public API says a join is in flight
    return coordinator.group_id is not None and coordinator.need_rejoin()


def _maybe_unreadable(err: Exception) -> bool:
    """Whether `err` from a poll may be a batch the client cannot decode.

    Codec and CRC errors are; so is anything not a Kafka error (a decompressor's own
    error). Other Kafka errors (authorization, configuration) are not a batch's fault.
    """
    if isinstance(err, UnsupportedCodecError | CorruptRecordError):
        return True
    return not isinstance(err, KafkaError)


class _Listener(AsyncConsumerRebalanceListener):  # type: ignore[misc]
    """kafka-python awaits these on its IO thread (see `KafkaSource._revoked`)."""

    def __init__(self, source: KafkaSource):
        self._source = source

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._source._assigned(assigned)

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._source._revoked(revoked)

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        # Evicted: another member may own them already, so nothing is committed. The
        # model keeps what it learned; `handled` still says where it stands.
        log.warning("partitions lost (member evicted) partitions=%s", _numbers(lost))
        self._source._retire(lost)


def _numbers(partitions: Iterable[TopicPartition]) -> list[int]:
    return sorted(tp.partition for tp in partitions)


def ensure_topic(
    settings: KafkaSettings, name: str, partitions: int | None, replication: int, like: str
) -> int:
    """Create topic `name` unless it exists; return its partition count.

    Not left to the broker's auto-creation, whose partition count is the broker's choice
    (Tansu's is 4). `partitions` None: as many as topic `like` (the source) has.
    """
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(**settings.common())
    try:
        if partitions is None:
            described = admin.describe_topics([like])
            partitions = max(1, len(described[0]["partitions"])) if described else 1
        try:
            admin.create_topics([NewTopic(name, partitions, replication)])
            log.info("topic created topic=%s partitions=%d", name, partitions)
        except TopicAlreadyExistsError:
            pass
        described = admin.describe_topics([name])
        return len(described[0]["partitions"]) if described else partitions
    except KafkaError as err:
        raise KafkaSourceError(f"cannot create or describe topic {name}: {err}") from err
    finally:
        admin.close()


class DeadLetterSink:
    """Send rejected messages, unchanged, to a dead-letter topic with the reason in headers.

    The original key, headers and timestamp are kept; streamcl's headers come after the
    original ones (a reader taking the last value of a name gets streamcl's). A message
    from source partition p goes to partition p mod `partitions`, so the dead letters of
    one source partition keep its order whatever their keys (None: the producer's choice).

    `flush` blocks until every sent message is acknowledged and raises if any failed:
    callers flush before committing offsets, so a rejected message is never lost.
    """

    def __init__(self, settings: KafkaSettings, topic: str, partitions: int | None = None):
        self.topic = topic
        self.partitions = partitions
        self._pending: list[Any] = []
        config = {
            "acks": "all",
            "max_request_size": 1024 * 1024,
            **SIDE_TOPIC_BATCHING,
            **settings.common(),
            **settings.producer,
        }
        try:
            self._producer = KafkaProducer(**config)
        except KafkaError as err:
            raise KafkaSourceError(
                f"cannot connect dead-letter producer to {settings.bootstrap_servers}: {err}"
            ) from err

    def send(
        self,
        rejected: Rejected,
        key: bytes | None = None,
        headers: Headers | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        """Queue `rejected` with the original `key`, `headers` and `timestamp_ms`."""
        payload = rejected.payload
        headers = [
            *(headers or []),
            ("streamcl-reason", rejected.reason.encode()),
            ("streamcl-detail", rejected.detail.encode()[:1024]),
        ]
        if rejected.origin is not None:
            headers += [
                ("source-topic", rejected.origin.topic.encode()),
                ("source-partition", str(rejected.origin.partition).encode()),
                ("source-offset", str(rejected.origin.offset).encode()),
            ]
            if rejected.last_offset is not None:
                headers.append(("source-offset-last", str(rejected.last_offset).encode()))
        if len(payload) > MAX_DEAD_LETTER_PAYLOAD:
            headers.append(("streamcl-original-size", str(len(payload)).encode()))
            payload = payload[:MAX_DEAD_LETTER_PAYLOAD]
        timestamp = timestamp_ms if timestamp_ms is not None and timestamp_ms >= 0 else None
        value = None if rejected.reason == TOMBSTONE else payload  # a tombstone stays one
        partition = None
        if self.partitions is not None and rejected.origin is not None:
            partition = rejected.origin.partition % self.partitions
        self._pending.append(
            self._producer.send(
                self.topic,
                value=value,
                key=key,
                headers=headers,
                timestamp_ms=timestamp,
                partition=partition,
            )
        )

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for every sent message; raises `KafkaSourceError` if one failed."""
        if not self._pending:
            return
        self._producer.flush(timeout=timeout_s)
        failed = [f for f in self._pending if not f.succeeded()]
        if failed:
            # Keep them pending: the caller retries flush and must not commit meanwhile.
            err = failed[0].exception if failed[0].is_done else "not acknowledged"
            raise KafkaSourceError(
                f"{len(failed)} dead letters not delivered to {self.topic}: {err}"
            )
        self._pending = []

    def close(self) -> None:
        self._producer.close(timeout=5)


class Publisher:
    """Produce raw payloads (already encoded) to a topic: `streamcl publish`."""

    def __init__(self, settings: KafkaSettings):
        config = {
            "linger_ms": 5,
            "batch_size": 256 * 1024,
            **settings.common(),
            **settings.producer,
        }
        try:
            self._producer = KafkaProducer(**config)
        except KafkaError as err:
            raise KafkaSourceError(
                f"cannot connect producer to {settings.bootstrap_servers}: {err}"
            ) from err

    def send(self, topic: str, payload: bytes, timestamp_ms: int | None = None) -> None:
        self._producer.send(topic, value=payload, timestamp_ms=timestamp_ms)

    def flush(self, timeout_s: float = 60.0) -> None:
        self._producer.flush(timeout=timeout_s)

    def close(self) -> None:
        self._producer.close(timeout=10)


@dataclass(frozen=True)
class RecordedMessage:
    partition: int
    offset: int
    timestamp_ms: int
    payload: bytes


def read_topic(
    settings: KafkaSettings,
    topic: str,
    max_messages: int | None = None,
    until_idle_s: float | None = None,
    poll_timeout_ms: int = 200,
) -> Iterable[RecordedMessage]:
    """Read a topic from the beginning of every partition, without a consumer group.

    Stops after `max_messages`, or once nothing arrived for `until_idle_s` seconds.
    """
    consumer = KafkaConsumer(enable_auto_commit=False, **settings.common(), **settings.consumer)
    try:
        partitions = _wait_for_partitions(consumer, topic, timeout_s=10.0)
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        count, last_arrival = 0, time.monotonic()
        while max_messages is None or count < max_messages:
            batches = consumer.poll(timeout_ms=poll_timeout_ms)
            if not batches:
                if until_idle_s is not None and time.monotonic() - last_arrival >= until_idle_s:
                    return
                continue
            last_arrival = time.monotonic()
            for tp, records in batches.items():
                for record in records:
                    yield RecordedMessage(
                        tp.partition, record.offset, record.timestamp, record.value or b""
                    )
                    count += 1
                    if max_messages is not None and count >= max_messages:
                        return
    finally:
        consumer.close(autocommit=False)


def _wait_for_partitions(
    consumer: KafkaConsumer, topic: str, timeout_s: float
) -> list[TopicPartition]:
    deadline = time.monotonic() + timeout_s
    while True:
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            return [TopicPartition(topic, p) for p in sorted(partitions)]
        if time.monotonic() > deadline:
            raise KafkaSourceError(f"topic {topic!r} has no partitions (does it exist?)")
        time.sleep(0.2)


def wait_for_bootstrap(settings: KafkaSettings, timeout_s: float) -> None:
    """Wait until a bootstrap server accepts a TCP connection; fail once, clearly, if none does.

    Checked before any kafka-python client exists: their own bootstrap retries log an
    ERROR line per attempt for 30 s and then name no reason.
    """
    servers = [s.strip() for s in settings.bootstrap_servers.split(",") if s.strip()]
    deadline = time.monotonic() + timeout_s
    reasons: dict[str, str] = {}
    logged = False
    while True:
        for server in servers:
            reason = _unreachable(server, max(0.1, min(2.0, deadline - time.monotonic())))
            if reason is None:
                return
            reasons[server] = reason
        if time.monotonic() >= deadline:
            detail = ", ".join(f"{server} ({reason})" for server, reason in reasons.items())
            raise KafkaSourceError(
                f"cannot reach any Kafka bootstrap server within {timeout_s:g} s: {detail}"
            )
        if not logged:
            log.info("waiting for Kafka bootstrap_servers=%s", ",".join(servers))
            logged = True
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def _unreachable(server: str, timeout_s: float) -> str | None:
    """Why `host:port` takes no TCP connection, or None when it does."""
    host, sep, port = server.rpartition(":")
    if not sep or not port.isdigit():
        return "not host:port"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except socket.gaierror as err:
        return f"unknown host: {err.strerror}"
    except TimeoutError:
        return f"no answer in {timeout_s:.1f} s"
    except OSError as err:
        return (err.strerror or str(err)).lower()
