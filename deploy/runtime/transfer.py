"""`publish` a recorded stream to Kafka and `record` a topic back into a stream file.

Both move payload bytes untouched, so record -> replay feeds the learner exactly what
Kafka carried, and publish -> serve sees exactly what the file holds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from streamcl.ingest.kafka import KafkaSettings, Publisher, read_topic
from streamcl.ingest.recorded import CorruptFrame, StreamReader, StreamWriter
from streamcl.ingest.schema import StreamSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishResult:
    sent: int
    corrupt_frames: int
    seconds: float


def publish_stream(
    stream: Path,
    settings: KafkaSettings,
    topic: str,
    rate: float | None = None,
    keep_timestamps: bool = False,
    progress: bool | None = None,
) -> PublishResult:
    """Send every intact frame's payload to `topic`, at most `rate` messages/second.

    Kafka timestamps are the send time unless `keep_timestamps` (arrival-to-update
    latency is measured against them).
    """
    publisher = Publisher(settings)
    sent = corrupt = 0
    started = time.monotonic()
    try:
        with StreamReader(stream) as reader:
            bar = tqdm(
                reader,
                total=reader.header.get("num_messages"),
                unit="msg",
                desc="publish",
                disable=None if progress is None else not progress,
            )
            for frame in bar:
                if isinstance(frame, CorruptFrame):
                    corrupt += 1
                    log.warning("corrupt frame not published position=%d", frame.position)
                    continue
                if rate is not None:
                    # Pace against the start time, so a slow send is caught up, not compounded.
                    delay = started + sent / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                timestamp = frame.timestamp_ms if keep_timestamps else int(time.time() * 1000)
                publisher.send(topic, frame.payload, timestamp)
                sent += 1
        publisher.flush()
    finally:
        publisher.close()
    return PublishResult(sent, corrupt, time.monotonic() - started)


def record_topic(
    settings: KafkaSettings,
    topic: str,
    out: Path,
    spec: StreamSpec,
    max_messages: int | None = None,
    until_idle: float | None = None,
    progress: bool | None = None,
) -> int:
    """Write a topic's messages (all partitions, from the beginning) to a stream file."""
    meta = {"recorded_from": topic}
    with StreamWriter(out, spec, meta) as writer:
        bar = tqdm(
            total=max_messages,
            unit="msg",
            desc="record",
            disable=None if progress is None else not progress,
        )
        for message in read_topic(settings, topic, max_messages, until_idle):
            writer.write(message.payload, message.offset, message.timestamp_ms)
            bar.update()
        bar.close()
        return writer.frames_written
