"""Seed-to-seed spread of the figures the Fashion-MNIST acceptance tests assert.

    python benchmarks/seed_spread.py [--seeds 0,1,2] [--threads 1]

Builds the acceptance tests' permuted stream (5 tasks x 10,000 samples, the stream's
own seed varied with the learner's) and replays each configuration the tests use, per
seed. The spread (max - min over seeds) of every figure is what the tests' tolerances
are grounded in: a floating-point path on another CPU moves a figure by less than a
change of seed does. Writes benchmarks/results/seed_spread.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from streamcl.deploy.runtime.config import PLAIN_LEARNING, ReplayConfig, validated
from streamcl.deploy.runtime.replay import run_replay
from streamcl.ingest.datasets import load
from streamcl.ingest.scenarios import ScenarioConfig, build, write

RESULTS = Path(__file__).parent / "results" / "seed_spread.json"
SAMPLES_PER_TASK = 10_000
CHANGES = [SAMPLES_PER_TASK * k for k in range(1, 5)]
DETECTION_WINDOW = 1000
CONFIGS: dict[str, dict[str, Any]] = {
    "naive": {"strategy": "naive"},
    "ewc": {"strategy": "ewc"},
    "ewc-adwin": {"strategy": "ewc", "use_task_ids": False, "detector": {"kind": "adwin"}},
    "ewc-page-hinkley": {
        "strategy": "ewc",
        "use_task_ids": False,
        "detector": {"kind": "page-hinkley"},
    },
    "er+ewc": {"strategy": "er+ewc"},
}


def figures(report: dict[str, Any]) -> dict[str, float]:
    events = report["drift_events"]
    matched = {e for e in events for c in CHANGES if c <= e < c + DETECTION_WINDOW}
    return {
        "final_average_accuracy": report["final_average_accuracy"],
        "average_forgetting": report["average_forgetting"],
        "changes_found": sum(any(c <= e < c + DETECTION_WINDOW for e in events) for c in CHANGES),
        "false_alarms": len(set(events) - matched),
        "rejected_noisy_share": report["samples_rejected_noisy"] / report["samples_seen"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", help="comma-separated configuration names")
    parser.add_argument("--variants", default="defaults,plain", help="defaults, plain or both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.only.split(",") if args.only else list(CONFIGS)
    data = load("fashion-mnist")
    runs: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            stream = Path(tmp) / f"permuted-{seed}.scs"
            scenario = ScenarioConfig(
                "permuted", tasks=5, samples_per_task=SAMPLES_PER_TASK, seed=seed
            )
            write(build(data, scenario), stream)
            for name in names:
                for variant in args.variants.split(","):
                    extra = {"defaults": {}, "plain": PLAIN_LEARNING}[variant]
                    settings = {"stream": stream, "seed": seed, "threads": args.threads}
                    config = validated(ReplayConfig, {**settings, **CONFIGS[name], **extra})
                    result = figures(run_replay(config, progress=False))
                    key = f"{name}/{variant}"
                    for figure, value in result.items():
                        runs.setdefault(key, {}).setdefault(figure, []).append(value)
                    print(f"seed {seed} {key}: {json.dumps(result)}", flush=True)
    summary = {
        key: {f: {"values": v, "spread": max(v) - min(v)} for f, v in per.items()}
        for key, per in runs.items()
    }
    out = {"seeds": seeds, "threads": args.threads, "runs": summary}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
