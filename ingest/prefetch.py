"""Fetch and decode ahead of the learner: a bounded prefetch thread over a `KafkaSource`.

Which thread does what with the consumer (kafka-python's is not thread-safe): the
prefetch thread alone polls, so it alone decodes, seeks past unreadable batches and
drives rebalances (kafka-python runs their listeners while a poll waits). The caller's
thread learns; of the consumer it only commits, which kafka-python 3.0 runs as a
coroutine on its IO thread (documented safe from several caller threads), and it reads
lag and assignment as the prefetch thread left them after its latest poll.

Back-pressure: at most `depth` polls wait in the queue; when it is full the thread waits
for the learner, so memory stays bounded and the consumer's position runs at most
`depth` polls ahead of the learner. Offsets are unaffected: checkpoints and commits
cover `KafkaSource.handled`, which only the caller advances as it handles arrivals.
Arrivals fetched before their partition was revoked, lost or reassigned are stale
(`KafkaSource.current`): the caller drops them, and the partition, if it comes back,
is sought to the offset the learner handled.
"""

from __future__ import annotations

import queue
import threading
import time
from types import TracebackType

from streamcl.ingest.kafka import Arrival, KafkaSource

PREFETCH_DEPTH = 4
"""Polls fetched and decoded ahead of the learner (each up to `max_records` messages)."""
_WAIT_S = 0.1
"""How often a thread waiting on the queue looks up to see whether it should stop."""


class Prefetcher:
    """Polls `source` on its own thread into a queue of at most `depth` polls."""

    def __init__(
        self,
        source: KafkaSource,
        timeout_ms: int,
        max_records: int,
        depth: int = PREFETCH_DEPTH,
    ):
        self.source = source
        self.timeout_ms = timeout_ms
        self.max_records = max_records
        self._queue: queue.Queue[list[Arrival] | BaseException] = queue.Queue(depth)
        self._stopping = threading.Event()
        self._lag: dict[int, int] = {}
        self._assignment: list[int] = []
        self.alive_at = time.monotonic()
        """When the thread last polled, or last waited for room in a full queue."""
        self._thread = threading.Thread(target=self._run, name="streamcl-prefetch", daemon=True)

    def __enter__(self) -> Prefetcher:
        self._thread.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def get(self, timeout_s: float) -> list[Arrival]:
        """The next poll's arrivals ([] after `timeout_s` without one); a poll's error is
        raised here, after the arrivals fetched before it."""
        try:
            item = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return []
        if isinstance(item, BaseException):
            raise item
        return item

    def lag(self) -> dict[int, int]:
        """Per-partition lag after the latest poll (see `KafkaSource.lag`)."""
        return self._lag

    def assignment(self) -> list[int]:
        """Partitions assigned after the latest poll."""
        return self._assignment

    def stop(self) -> None:
        """Stop polling and wait for the thread; arrivals still queued are dropped (they
        were never handled, so no checkpoint claims them)."""
        self._stopping.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                arrivals = self.source.poll(self.timeout_ms, self.max_records)
                self._lag, self._assignment = self.source.lag(), self.source.assignment()
                self.alive_at = time.monotonic()
                if arrivals:
                    self._put(arrivals)
        except BaseException as err:  # the caller's thread raises it, in order
            self._put(err)

    def _put(self, item: list[Arrival] | BaseException) -> None:
        while not self._stopping.is_set():
            try:
                self._queue.put(item, timeout=_WAIT_S)
                return
            except queue.Full:
                self.alive_at = time.monotonic()  # waiting for the learner is progress
