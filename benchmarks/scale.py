"""Scale-out: `streamcl serve` under torchrun with 1 and 2 CPU ranks (gloo) over one
4-partition topic of the embedded broker: samples/s, the all-reduce's share of step time,
and final accuracy per seed (so the two-rank accuracy gap is read against seed spread).

    python benchmarks/scale.py [--dataset digits|fashion-mnist] [--samples-per-task N]
        [--seeds 0 1 2]

Writes benchmarks/results/scale.json (digits, the whole set) or
benchmarks/results/scale-<dataset>-<N>.json. Each rank runs ER on 1 thread; the global
batch (10), memory (1000) and replay draws are split over the ranks
(deploy/runtime/distributed.py). The class-incremental stream (5 tasks of 2 classes) is
the same for every seed (scenario seed 0); the seed is the learner's. Accuracy is the
final average accuracy on the held-out set (Fashion-MNIST: its 10,000 test images).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _report import machine, write_results
from kafka import KafkaProducer

from streamcl.deploy.devbroker.tansu import EmbeddedBroker, free_port
from streamcl.ingest.datasets import load
from streamcl.ingest.recorded import Frame, StreamReader
from streamcl.ingest.scenarios import ScenarioConfig, build, write

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PARTITIONS = 4
FAST_GROUP = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 300}


def publish(broker: EmbeddedBroker, topic: str, stream: Path) -> int:
    """Sample i to partition i % 4, in small batches so consumers read partitions interleaved."""
    with StreamReader(stream) as reader:
        payloads = [frame.payload for frame in reader if isinstance(frame, Frame)]
    producer = KafkaProducer(
        bootstrap_servers=broker.bootstrap_servers, linger_ms=50, batch_size=4096, acks="all"
    )
    for i, payload in enumerate(payloads):
        producer.send(topic, payload, partition=i % PARTITIONS)
    producer.flush(timeout=60)
    producer.close()
    return len(payloads)


def serve(broker: EmbeddedBroker, topic: str, stream: Path, workdir: Path, ranks: int, seed: int):
    with StreamReader(stream) as reader:
        spec = reader.spec
    config = {
        "kafka": {
            "bootstrap_servers": broker.bootstrap_servers,
            "topic": topic,
            "group_id": f"scale-{ranks}-{seed}",
            "consumer": {**FAST_GROUP, "max_partition_fetch_bytes": 16 * 1024},
            "poll_timeout_ms": 100,
        },
        "spec": spec.to_dict(),
        "learner": {"strategy": "er", "memory": 1000, "device": "cpu", "seed": seed, "threads": 1},
        "checkpoint": {"dir": str(workdir / "checkpoints"), "every_updates": 100},
        "http": {"port": free_port()},
        "probe": {"fraction": 0},
        "heldout": str(stream) + ".eval.npz",
        "until_idle": 2.0,
        "log_every": 0,
        "report": str(workdir / "report.json"),
    }
    workdir.mkdir(parents=True)
    path = workdir / "service.json"
    path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [
        f"--nproc-per-node={ranks}",
        "-m",
        "streamcl.deploy.cli",
        "serve",
        "--config",
        str(path),
    ]
    # The caller's PYTHONPATH first: a worktree's namespace links then win over the install.
    pythonpath = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"serve with {ranks} ranks failed:\n{done.stderr[-3000:]}")
    report = json.loads((workdir / "report.json").read_text())
    ranks_info = report["ranks"]
    return {
        "ranks": ranks,
        "seed": seed,
        "final_average_accuracy": report["final_average_accuracy"],
        "samples_learned": report["samples_learned_all_ranks"],
        # Ranks learn at the same time: the group's rate is the sum of theirs.
        "samples_per_second": sum(r["samples_per_second"] for r in ranks_info),
        "per_rank_samples_per_second": [r["samples_per_second"] for r in ranks_info],
        "communication_share": [r["communication_share"] for r in ranks_info],
        "identical_models": len({r["model_sha256"] for r in ranks_info}) == 1,
        "wall_seconds_with_startup": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument(
        "--samples-per-task", type=int, default=None, help="default: every training sample"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    scenario = ScenarioConfig(tasks=5, samples_per_task=args.samples_per_task, seed=0)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        stream = Path(tmp) / "stream.scs"
        write(build(load(args.dataset), scenario), stream)
        broker.create_topic("scale", partitions=PARTITIONS)
        total = publish(broker, "scale", stream)
        for seed in args.seeds:
            for ranks in (1, 2):
                run = serve(broker, "scale", stream, Path(tmp) / f"r{ranks}-s{seed}", ranks, seed)
                print(json.dumps(run), flush=True)
                runs.append(run)
    gaps = [
        two["final_average_accuracy"] - one["final_average_accuracy"]
        for one, two in zip(runs[::2], runs[1::2], strict=True)
    ]
    means = {
        str(ranks): statistics.fmean(
            r["final_average_accuracy"] for r in runs if r["ranks"] == ranks
        )
        for ranks in (1, 2)
    }
    result = {
        "dataset": args.dataset,
        "scenario": "class-incremental, 5 tasks of 2 classes, scenario seed 0",
        "samples_per_task": args.samples_per_task,
        "samples": total,
        "seeds": args.seeds,
        "partitions": PARTITIONS,
        "runs": runs,
        "accuracy_gap_two_minus_one": gaps,
        "mean_final_accuracy_by_ranks": means,
        "mean_accuracy_gap": means["2"] - means["1"],
        "accuracy_spread_one_rank": _spread([r for r in runs if r["ranks"] == 1]),
        "accuracy_spread_two_ranks": _spread([r for r in runs if r["ranks"] == 2]),
        "machine": machine(),
    }
    name = (
        "scale.json"
        if args.samples_per_task is None and args.dataset == "digits"
        else (f"scale-{args.dataset}-{args.samples_per_task or 'all'}.json")
    )
    write_results(RESULTS / name, result)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


def _spread(runs: list[dict[str, Any]]) -> float:
    """Max minus min final accuracy over the seeds (what a gap is read against)."""
    accuracies = [r["final_average_accuracy"] for r in runs]
    return max(accuracies) - min(accuracies)


if __name__ == "__main__":
    main()
