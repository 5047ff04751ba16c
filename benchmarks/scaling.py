"""How `streamcl replay` scales: samples/second and peak RSS as the memory and the batch grow.

    python benchmarks/scaling.py [--memories 1000,10000,100000] [--batches 10,32,128]
        [--threads 1] [--tasks 3]

The stream is permuted Fashion-MNIST, each task the whole 60,000-image training set under
its own pixel permutation (3 tasks: 180,000 arrivals), so a 100,000-item memory fills
after 100,000 arrivals and is then full for the rest: the figures cover filling and
steady state, as a long-running service sees them. Memory sweep at batch 10, batch sweep
at memory 1,000; each with plain ER (`er`) and with the defaults (`default`: the
noise filter, ER-ACE, logit adjustment, quarantine). Every run is its own process, so
its peak RSS (`ru_maxrss`) is its own; held-out evaluation is excluded from samples/s,
as in the report. Writes benchmarks/results/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _report import machine, write_results

from streamcl.ingest.datasets import load
from streamcl.ingest.scenarios import ScenarioConfig, build, write

RESULTS = Path(__file__).parent / "results" / "scaling.json"
VARIANTS = {"er": "PLAIN_LEARNING", "default": "{}"}
CHILD = """
import json, resource, sys
from pathlib import Path
from streamcl.deploy.runtime.config import PLAIN_LEARNING, ReplayConfig
from streamcl.deploy.runtime.replay import run_replay
memory, batch, threads = (int(a) for a in sys.argv[2:5])
config = ReplayConfig(stream=Path(sys.argv[1]), memory=memory, batch_size=batch,
                      threads=threads, **{variant})
report = run_replay(config, progress=False)
print(json.dumps({{
    "samples_per_second": round(report["samples_per_second"], 1),
    "final_average_accuracy": round(report["final_average_accuracy"], 4),
    "memory_items": report["memory"]["items"],
    "memory_mb": round(sum(report["memory"]["bytes"].values()) / 2**20, 1),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
}}))
"""


def run(stream: Path, variant: str, memory: int, batch: int, threads: int) -> dict[str, Any]:
    """One `run_replay` in a fresh interpreter; its figures and its own peak RSS."""
    code = CHILD.format(variant=VARIANTS[variant])
    done = subprocess.run(
        [sys.executable, "-c", code, str(stream), str(memory), str(batch), str(threads)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"run {variant} memory={memory} batch={batch} failed:\n{done.stderr}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row.update(variant=variant, memory=memory, batch_size=batch, threads=threads)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memories", default="1000,10000,100000", help="at batch 10")
    parser.add_argument("--batches", default="10,32,128", help="at memory 1,000")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads per run")
    parser.add_argument("--tasks", type=int, default=3, help="permuted tasks of 60,000")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="of: er, default")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS):
        parser.error(f"variants must be of {', '.join(VARIANTS)}, got {args.variants}")
    memories = [int(m) for m in args.memories.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stream = Path(tmp) / "permuted.scs"
        scenario = ScenarioConfig(scenario="permuted", tasks=args.tasks, seed=0)
        write(build(load("fashion-mnist"), scenario), stream)
        for variant in variants:
            rows += [run(stream, variant, m, 10, args.threads) for m in memories]
            rows += [run(stream, variant, 1000, b, args.threads) for b in batches if b != 10]
    result = {
        "benchmark": f"streamcl replay, permuted Fashion-MNIST {args.tasks}x60,000, MLP 256x2",
        "command": f"python benchmarks/scaling.py --memories {args.memories} "
        f"--batches {args.batches} --threads {args.threads} --tasks {args.tasks} "
        f"--variants {args.variants}",
        "threads": args.threads,
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "rows": rows,
        "machine": machine(),
    }
    write_results(args.out, result)


if __name__ == "__main__":
    main()
