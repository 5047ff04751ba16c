"""Noisy and long-tailed Split Fashion-MNIST: the filters, quarantine and loss corrections
against plain experience replay, via `streamcl replay`'s own code path.

    python benchmarks/dirty_streams.py [--streams clean,noise40,imb10,both] \
        [--runs er,er-reservoir,er-3,er-reservoir-3,ace,default,no-gate,small-loss] \
        [--seeds 0,1,2] [--jobs 2]

Class-incremental 5 x 2, one pass, batch 10, MLP 784-400-400-10, memory 1000, 1 thread
per run (`--jobs` runs in parallel). Seed s builds the stream (class order, long tail,
which labels are corrupted) and seeds the learner, so the mean covers other class orders
too. Prints and writes per-run rows and, per stream and run, the mean over the seeds
(benchmarks/results/dirty_streams.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from streamcl.deploy.runtime.config import PLAIN_LEARNING, ReplayConfig
from streamcl.deploy.runtime.replay import run_replay
from streamcl.ingest.datasets import load
from streamcl.ingest.scenarios import ScenarioConfig, build, write

RESULTS = Path(__file__).parent / "results" / "dirty_streams.json"
STREAMS: dict[str, dict[str, Any]] = {
    "clean": {},
    "noise40": {"noise": 0.4},
    "imb10": {"imbalance": 10.0},
    "both": {"noise": 0.4, "imbalance": 10.0},
}
ONE_DRAW = {"replay_size": 10}
"""One replay draw per new sample, as ER-1000 was when the dirty-streams issue was filed."""
RUNS: dict[str, dict[str, Any]] = {
    "er": {**PLAIN_LEARNING, **ONE_DRAW},  # that ER-1000: class-balanced memory
    "er-reservoir": {**PLAIN_LEARNING, **ONE_DRAW, "memory_policy": "reservoir"},
    # Plain ER with today's default of three draws per new sample:
    "er-3": PLAIN_LEARNING,
    "er-reservoir-3": {**PLAIN_LEARNING, "memory_policy": "reservoir"},
    "ace": {"noise": PLAIN_LEARNING["noise"], "loss": {"logit_adjust_tau": 0.0}},
    "default": {},  # what `streamcl replay` does with no flags
    # The defaults with a memory that takes every admitted arrival:
    "no-gate": {"noise": {"memory_agreement": False}},
    # The defaults before the kNN filter, the memory gate and ACE's recent share:
    "small-loss": {
        "noise": {"knn": False, "memory_agreement": False},
        "loss": {"ace_recent_share": 1.0},
    },
}
COMMON = {"hidden": (400, 400), "memory": 1000, "batch_size": 10, "threads": 1, "device": "cpu"}


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per 'stream/run': the seeds' mean accuracy, head and tail halves, filter figures."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(f"{row['stream']}/{row['run']}", []).append(row)
    means = {}
    for key, group in groups.items():
        filters = [r["filter"] for r in group if r["filter"]]
        means[key] = {
            "seeds": [r["seed"] for r in group],
            "final_average_accuracy": mean(r["final_average_accuracy"] for r in group),
            "head_accuracy": mean(r["head_accuracy"] for r in group),
            "tail_accuracy": mean(r["tail_accuracy"] for r in group),
            "rejected_precision": mean(f.get("rejected_precision") for f in filters),
            "rejected_recall": mean(f.get("rejected_recall") for f in filters),
            "samples_per_second": mean(r["samples_per_second"] for r in group),
            "accounting_holds": all(r["accounting_holds"] for r in group),
        }
    return means


def mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.fmean(present), 4) if present else None


def run_one(stream: Path, name: str, run: str, seed: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    config = ReplayConfig(stream=stream, seed=seed, **COMMON, **RUNS[run])
    report = run_replay(config, progress=False)
    return {
        "stream": name,
        "run": run,
        "seed": seed,
        "final_average_accuracy": round(report["final_average_accuracy"], 4),
        "head_accuracy": report["head_accuracy"],
        "tail_accuracy": report["tail_accuracy"],
        "samples_seen": report["samples_seen"],
        "samples_learned": report["samples_learned"],
        "samples_quarantined_total": report["samples_quarantined_total"],
        "samples_readmitted": report["samples_readmitted"],
        "samples_rejected_noisy": report["samples_rejected_noisy"],
        "samples_in_quarantine": report["samples_quarantined"],
        "accounting_holds": report["accounting_holds"],
        "filter": report.get("filter"),
        "samples_per_second": round(report["samples_per_second"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default=",".join(STREAMS))
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--seeds", default="0,1,2", help="stream and learner seeds")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    data = load("fashion-mnist")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name in args.streams.split(","):
            for seed in seeds:
                paths[name, seed] = Path(tmp) / f"{name}-{seed}.scs"
                scenario = ScenarioConfig(tasks=5, seed=seed, **STREAMS[name])
                write(build(data, scenario), paths[name, seed])
        jobs = [
            (paths[name, seed], name, run, seed)
            for name, seed in paths
            for run in args.runs.split(",")
        ]
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            rows = []
            for row in pool.map(run_one, *zip(*jobs, strict=True)):
                print(json.dumps(row), flush=True)
                rows.append(row)
    # Rows of the streams and runs not rerun keep their earlier figures.
    earlier = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    rerun = {(row["stream"], row["run"]) for row in rows}
    rows = [r for r in earlier.get("results", []) if (r["stream"], r["run"]) not in rerun] + rows
    command = (
        f"python benchmarks/dirty_streams.py --streams {args.streams} "
        f"--runs {args.runs} --seeds {args.seeds} --jobs {args.jobs}"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "Split Fashion-MNIST 5x2, one pass, batch 10, MLP 784-400-400-10, "
                "memory 1000; stream seed = learner seed",
                "command": f"{earlier['command']}; then {command}" if earlier else command,
                "torch": torch.__version__,
                "threads": 1,
                "means": summarise(rows),
                "results": rows,
            },
            indent=2,
        )
        + "\n"
    )
    for key, figures in summarise(rows).items():
        print(key, json.dumps(figures))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
