"""End-to-end `serve` throughput from a local broker vs raw kafka-python consume+decode and
vs `streamcl replay` of the same stream with the same learner, and arrival-to-update
latency at a fixed publish rate. One run, one machine. `serve` runs twice on the same topic:
as shipped (a prefetch thread polls and decodes while the learner steps) and with polling
inline on the learner's thread, as before the prefetch thread, for a side-by-side figure.

    python benchmarks/kafka_service.py [--stream PATH] [--rate 2000]

Writes benchmarks/results/kafka_service.json. Uses the embedded Tansu broker
(memory storage) on 127.0.0.1; the learner runs ER-1000 on 1 thread.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any
from unittest import mock

from _report import machine, write_results
from kafka import KafkaConsumer, TopicPartition

from streamcl.deploy.devbroker.tansu import EmbeddedBroker, free_port
from streamcl.deploy.runtime.config import ReplayConfig, ServiceConfig, validated
from streamcl.deploy.runtime.replay import run_replay
from streamcl.deploy.runtime.serve import run_service
from streamcl.deploy.runtime.transfer import publish_stream
from streamcl.ingest.codec import decode
from streamcl.ingest.datasets import load
from streamcl.ingest.kafka import Arrival, KafkaSettings, KafkaSource
from streamcl.ingest.recorded import StreamReader
from streamcl.ingest.scenarios import ScenarioConfig, build, write

RESULTS = Path(__file__).parent / "results" / "kafka_service.json"
FAST_GROUP = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 300}


def raw_consume_rate(broker: EmbeddedBroker, topic: str, stream: Path, total: int) -> float:
    """kafka-python alone: fetch every message of the topic and decode it (messages/s)."""
    with StreamReader(stream) as reader:
        spec = reader.spec
    consumer = KafkaConsumer(
        bootstrap_servers=broker.bootstrap_servers,
        enable_auto_commit=False,
        max_partition_fetch_bytes=10 * 1024 * 1024,
        fetch_max_wait_ms=100,
    )
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    count, started = 0, time.perf_counter()
    while count < total:
        for records in consumer.poll(timeout_ms=500, max_records=500).values():
            for record in records:
                decode(record.value, spec)
                count += 1
    rate = count / (time.perf_counter() - started)
    consumer.close()
    return rate


class InlinePoll:
    """`Prefetcher`'s interface, polling on the caller's thread: the loop before prefetching."""

    def __init__(self, source: KafkaSource, timeout_ms: int, max_records: int):
        self.source, self.timeout_ms, self.max_records = source, timeout_ms, max_records
        self.alive_at = time.monotonic()

    def __enter__(self) -> InlinePoll:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        return None

    def get(self, _timeout_s: float) -> list[Arrival]:
        arrivals = self.source.poll(self.timeout_ms, self.max_records)
        self.alive_at = time.monotonic()
        return arrivals

    def lag(self) -> dict[int, int]:
        return self.source.lag()

    def assignment(self) -> list[int]:
        return self.source.assignment()


def serve_config(
    broker: EmbeddedBroker,
    topic: str,
    workdir: Path,
    spec: dict[str, Any],
    heldout: Path,
    name: str = "",
) -> ServiceConfig:
    return ServiceConfig.model_validate(
        {
            "kafka": {
                "bootstrap_servers": broker.bootstrap_servers,
                "topic": topic,
                "group_id": f"bench-{topic}{name}",
                "consumer": FAST_GROUP,
            },
            "spec": spec,
            "learner": {"strategy": "er", "memory": 1000, "threads": 1},
            "checkpoint": {"dir": str(workdir / f"ckpt-{topic}{name}")},
            "snapshot": {"dir": None},
            "http": {"port": free_port()},
            "heldout": str(heldout),
            "until_idle": 3.0,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", type=Path, help="stream file (default: build Split FMNIST)")
    parser.add_argument("--rate", type=float, default=2000.0, help="publish rate for latency")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        workdir = Path(tmp)
        stream = args.stream or workdir / "split-fmnist.scs"
        if args.stream is None:
            write(build(load("fashion-mnist"), ScenarioConfig(tasks=5, seed=0)), stream)
        with StreamReader(stream) as reader:
            spec, total = reader.spec.to_dict(), reader.header["num_messages"]
        heldout = Path(str(stream) + ".eval.npz")
        settings = KafkaSettings(broker.bootstrap_servers)

        load_before = os.getloadavg()  # a shared machine: what else ran is part of the figure
        broker.create_topic("throughput")
        publish_stream(stream, settings, "throughput", progress=False)
        raw = raw_consume_rate(broker, "throughput", stream, total)
        config = serve_config(broker, "throughput", workdir, spec, heldout)
        served = run_service(config)
        with mock.patch("streamcl.deploy.runtime.service.Prefetcher", InlinePoll):
            inline = run_service(
                serve_config(broker, "throughput", workdir, spec, heldout, "-inline")
            )
        replayed = run_replay(
            validated(ReplayConfig, {"stream": stream, **config.learner.model_dump()}),
            progress=False,
        )
        throughput = {
            "serve_samples_per_second": round(served["samples_per_second"], 1),
            "raw_consume_decode_per_second": round(raw, 1),
            "ratio": round(served["samples_per_second"] / raw, 3),
            "replay_samples_per_second": round(replayed["samples_per_second"], 1),
            "serve_to_replay_ratio": round(
                served["samples_per_second"] / replayed["samples_per_second"], 3
            ),
            "serve_inline_poll_samples_per_second": round(inline["samples_per_second"], 1),
            "serve_inline_poll_to_replay_ratio": round(
                inline["samples_per_second"] / replayed["samples_per_second"], 3
            ),
            "samples": served["samples_learned"],
            "final_average_accuracy": round(served["final_average_accuracy"], 4),
            "final_average_accuracy_inline_poll": round(inline["final_average_accuracy"], 4),
            "load_average_1_5_15_min": {
                "before": [round(v, 2) for v in load_before],
                "after": [round(v, 2) for v in os.getloadavg()],
            },
        }
        print(json.dumps(throughput))

        broker.create_topic("latency")
        publisher = threading.Thread(
            target=publish_stream,
            args=(stream, settings, "latency"),
            kwargs={"rate": args.rate, "progress": False},
            daemon=True,
        )
        publisher.start()
        paced = run_service(serve_config(broker, "latency", workdir, spec, heldout))
        publisher.join()
        latency = {
            "publish_rate_per_second": args.rate,
            "arrival_to_update_ms_p50": round(paced["arrival_to_update_ms"]["p50"], 2),
            "arrival_to_update_ms_p99": round(paced["arrival_to_update_ms"]["p99"], 2),
            "samples": paced["samples_learned"],
        }
        print(json.dumps(latency))
    write_results(
        RESULTS,
        {
            "benchmark": "serve on Split Fashion-MNIST (60k) from the embedded broker, ER-1000",
            "command": "python benchmarks/kafka_service.py --rate " + str(args.rate),
            "threads": 1,
            "throughput": throughput,
            "latency": latency,
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
