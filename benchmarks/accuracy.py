"""Final accuracy and forgetting of ER-1000 and naive on Split Fashion-MNIST, via replay.

    python benchmarks/accuracy.py [--stream PATH] [--seeds 0]

Writes benchmarks/results/accuracy.json. Single pass, batch 10, MLP 256x2, 1 thread.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from streamcl.deploy.runtime.config import ReplayConfig
from streamcl.deploy.runtime.replay import run_replay
from streamcl.ingest.datasets import load
from streamcl.ingest.scenarios import ScenarioConfig, build, write

RESULTS = Path(__file__).parent / "results" / "accuracy.json"
RUNS = {
    "er-1000-class-balanced": {"strategy": "er", "memory": 1000, "memory_policy": "class-balanced"},
    "er-1000-reservoir": {"strategy": "er", "memory": 1000, "memory_policy": "reservoir"},
    "naive": {"strategy": "naive"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", type=Path, help="stream file (default: build Split FMNIST)")
    parser.add_argument("--seeds", default="0", help="learner seeds, comma separated")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stream = args.stream
        if stream is None:
            stream = Path(tmp) / "split-fmnist.scs"
            write(build(load("fashion-mnist"), ScenarioConfig(tasks=5, seed=0)), stream)
        for name, settings in RUNS.items():
            for seed in (int(s) for s in args.seeds.split(",")):
                config = ReplayConfig(stream=stream, seed=seed, threads=1, **settings)
                report = run_replay(config, progress=False)
                rows.append(
                    {
                        "run": name,
                        "seed": seed,
                        "final_average_accuracy": round(report["final_average_accuracy"], 4),
                        "average_forgetting": round(report["average_forgetting"], 4),
                        "backward_transfer": round(report["backward_transfer"], 4),
                        "prequential_accuracy": round(report["prequential_accuracy"], 4),
                        "samples_per_second": round(report["samples_per_second"], 1),
                        "threads": report["environment"]["threads"],
                    }
                )
                print(json.dumps(rows[-1]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "Split Fashion-MNIST 5x2, single pass, batch 10, MLP 256x2",
                "command": "python benchmarks/accuracy.py --seeds " + args.seeds,
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
