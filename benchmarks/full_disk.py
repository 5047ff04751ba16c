"""`streamcl serve` with its checkpoint directory on a real filesystem that fills up.

    sudo mount -t tmpfs -o size=1m tmpfs /mnt/small
    sudo python benchmarks/full_disk.py --mount /mnt/small [--repo PATH --label NAME]

Needs root: it remounts the tmpfs (1 MB while the learner runs, 64 MB once the first
checkpoint write has failed and 6 s have passed: "space returns"). The digits stream
(1,348 messages) is published at 100 messages/s to the embedded broker; the learner
(ER-1000, checkpoint every 5 updates or 1 s, keep 3) runs as a real process from
`--repo` (default: this checkout; pass another checkout to measure it the same way).
Records the exit code, the log lines by level, the checkpoint failure lines, whether
a traceback was printed, and the group's committed offset while the disk was full and
at the end. Writes benchmarks/results/full_disk.json (one entry per --label).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from kafka.admin import KafkaAdminClient

from streamcl.deploy.devbroker.tansu import EmbeddedBroker, free_port
from streamcl.deploy.runtime.transfer import publish_stream
from streamcl.ingest.datasets import load_digits
from streamcl.ingest.kafka import KafkaSettings
from streamcl.ingest.scenarios import ScenarioConfig, build, write

RESULTS = Path(__file__).parent / "results" / "full_disk.json"
ROOT = Path(__file__).parent.parent
FAST_GROUP = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 300}
FAILED = ("checkpoint failed", "checkpoint not written", "Traceback")


def committed(broker: EmbeddedBroker, group: str) -> dict[int, int]:
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    try:
        offsets = admin.list_group_offsets(group)[group]
        return {tp.partition: meta.offset for tp, meta in offsets.items()}
    finally:
        admin.close()


def remount(mount: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)


def run(mount: Path, size: str, repo: Path, work: Path) -> dict[str, Any]:
    stream = work / "digits.scs"
    write(build(load_digits(), ScenarioConfig(tasks=5, seed=0)), stream)
    for path in mount.iterdir():
        subprocess.run(["rm", "-rf", str(path)], check=True)
    remount(mount, size)
    with EmbeddedBroker() as broker:
        topic = "full"
        broker.create_topic(topic)
        config = {
            "kafka": {
                "bootstrap_servers": broker.bootstrap_servers,
                "topic": topic,
                "group_id": "g",
                "consumer": FAST_GROUP,
                "poll_timeout_ms": 100,
            },
            "spec": {"feature_shape": [8, 8], "dtype": "uint8", "num_classes": 10},
            "learner": {"strategy": "er", "memory": 1000, "device": "cpu"},
            "checkpoint": {
                "dir": str(mount / "checkpoints"),
                "every_updates": 5,
                "every_seconds": 1,
                "keep": 3,
            },
            "snapshot": {"dir": None},
            "http": {"port": free_port()},
            "until_idle": 4,
            "log_every": 0,
        }
        (work / "service.yaml").write_text(yaml.safe_dump(config))
        settings = KafkaSettings(broker.bootstrap_servers)
        publisher = threading.Thread(
            target=publish_stream, args=(stream, settings, topic, 100.0), kwargs={"progress": False}
        )
        publisher.start()
        log_path = work / "serve.log"
        started = time.monotonic()
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "streamcl.deploy.cli",
                    "serve",
                    "--config",
                    str(work / "service.yaml"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=repo,
                env={**os.environ, "PYTHONPATH": str(repo), "PYTHONUNBUFFERED": "1"},
            )
            while not any(s in log_path.read_text() for s in FAILED) and process.poll() is None:
                if time.monotonic() - started > 180:
                    raise SystemExit("no checkpoint failure within 180 s")
                time.sleep(0.2)
            first_failure = time.monotonic() - started
            time.sleep(6)
            while_full = committed(broker, "g")
            remount(mount, "64m")
            publisher.join()
            code = process.wait(180)
        lines = log_path.read_text().splitlines()
        levels = collections.Counter(
            w[2] for w in (line.split() for line in lines) if len(w) > 2 and w[2].isupper()
        )
        return {
            "exit_code": code,
            "filesystem_size": size,
            "first_failure_seconds": round(first_failure, 1),
            "committed_while_full": while_full,
            "committed_at_end": committed(broker, "g"),
            "messages": 1348,
            "log_lines_by_level": dict(levels),
            "checkpoint_failure_lines": sum(
                "checkpoint" in line and ("ERROR" in line or "failed" in line) for line in lines
            ),
            "traceback": any("Traceback" in line for line in lines),
            "failure_log": [
                line[:240] for line in lines if "checkpoint" in line and " INFO " not in line
            ][:5],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mount", type=Path, required=True, help="a tmpfs mount point (root)")
    parser.add_argument("--size", default="1m", help="tmpfs size while the learner runs")
    parser.add_argument("--repo", type=Path, default=ROOT, help="checkout whose serve to run")
    parser.add_argument("--label", default="this checkout")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.mount, args.size, args.repo.resolve(), Path(tmp))
    result["command"] = " ".join(["python", *sys.argv])
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[args.label] = result
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
