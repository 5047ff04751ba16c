"""Noisy and long-tailed Split Fashion-MNIST: the filters, quarantine and loss corrections
against plain experience replay, via `streamcl replay`'s own code path.

    python benchmarks/dirty_streams.py [--streams clean,noise40,imb10,both] \
        [--runs er,er-reservoir,ace,default] [--seeds 0,1,2] [--jobs 2]

Class-incremental 5 x 2, one pass, batch 10, MLP 784-400-400-10, memory 1000, 1 thread
per run (`--jobs` runs in parallel). Writes benchmarks/results/dirty_streams.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
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
RUNS: dict[str, dict[str, Any]] = {
    "er": PLAIN_LEARNING,  # today's ER-1000, class-balanced memory
    "er-reservoir": {**PLAIN_LEARNING, "memory_policy": "reservoir"},
    "ace": {"noise": PLAIN_LEARNING["noise"], "loss": {"logit_adjust_tau": 0.0}},
    "default": {},  # what `streamcl replay` does with no flags
    "default-knn": {"noise": {"knn": True}},  # plus the opt-in kNN label filter
}
COMMON = {"hidden": (400, 400), "memory": 1000, "batch_size": 10, "threads": 1, "device": "cpu"}


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
    parser.add_argument("--seeds", default="0,1,2", help="learner seeds (stream seed is 0)")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    data = load("fashion-mnist")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name in args.streams.split(","):
            paths[name] = Path(tmp) / f"{name}.scs"
            write(build(data, ScenarioConfig(tasks=5, seed=0, **STREAMS[name])), paths[name])
        jobs = [
            (paths[name], name, run, int(seed))
            for name in paths
            for run in args.runs.split(",")
            for seed in args.seeds.split(",")
        ]
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            rows = []
            for row in pool.map(run_one, *zip(*jobs, strict=True)):
                print(json.dumps(row), flush=True)
                rows.append(row)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "Split Fashion-MNIST 5x2, one pass, batch 10, MLP 784-400-400-10, "
                "memory 1000; stream seed 0",
                "command": f"python benchmarks/dirty_streams.py --streams {args.streams} "
                f"--runs {args.runs} --seeds {args.seeds} --jobs {args.jobs}",
                "torch": torch.__version__,
                "results": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
