"""Throughput of `streamcl replay` against a bare PyTorch loop, and ER+EWC against ER.

The bare loop does the same arithmetic as ER-1000 (same MLP, same optimizer, 10 new + 10
replayed samples per step) with none of streamcl's decoding, validation, memory or
metrics. streamcl runs the same recorded stream as

- `er`: ER-1000 with plain learning (no noise filter, no ER-ACE, no logit adjustment);
- `er-default`: ER-1000 with the defaults: kNN and small-loss filters (the kNN filter
  searches the memory's FAISS index of pooled inputs), the memory gate, loss corrections;
- `er-default-index`: the same with the kNN head (the index then holds the model's
  penultimate features, re-embedded as the model learns);
- `er+ewc`: `er` plus online EWC (task ids: consolidation at each task change);
- `defaults`: `streamcl replay` as shipped: the defaults of `er-default` and 30 replay
  draws per step, not 10 (`REPLAY_PER_NEW_SAMPLE`): more arithmetic than the bare loop.

The first four draw 10 items per step, as the bare loop does.

Each round runs every variant once, in one process, so all see the same machine noise;
the figures are the best of --repeats rounds, and each ratio is also given as the median
of the per-round ratios (the steadier figure on a shared machine). streamcl's figure
excludes held-out probe evaluation, which it reports separately. Writes
benchmarks/results/throughput.json.

    python benchmarks/throughput.py [--stream PATH] [--threads 1,2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _report import machine, write_results

from streamcl.deploy.runtime.config import PLAIN_LEARNING, ReplayConfig
from streamcl.deploy.runtime.replay import run_replay
from streamcl.ingest.codec import decode
from streamcl.ingest.datasets import load
from streamcl.ingest.recorded import Frame, StreamReader
from streamcl.ingest.scenarios import ScenarioConfig, build, write
from streamcl.learner.models import mlp

RESULTS = Path(__file__).parent / "results" / "throughput.json"
SAME_DRAWS = {"replay_size": 10}
"""The bare loop's 10 draws per 10 new samples (streamcl's default is three per sample)."""
VARIANTS: dict[str, dict[str, Any]] = {
    "er": {"strategy": "er", **PLAIN_LEARNING, **SAME_DRAWS},
    "er-default": {"strategy": "er", **SAME_DRAWS},
    "er-default-index": {"strategy": "er", "predict_head": "knn", **SAME_DRAWS},
    "er+ewc": {"strategy": "er+ewc", **PLAIN_LEARNING, **SAME_DRAWS},
    "defaults": {},
}
RATIOS = {
    # name: (numerator, denominator) of samples/second
    "er / bare": ("er", "bare"),
    "er-default / bare": ("er-default", "bare"),
    "er-default-index / bare": ("er-default-index", "bare"),
    "defaults / bare": ("defaults", "bare"),
    "time er+ewc / time er": ("er", "er+ewc"),
}


def bare_loop(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """The reference: 15 lines of PyTorch; returns samples per wall and per CPU second."""
    torch.manual_seed(seed)
    model = mlp(features.shape[1:], 10, (256, 256))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.from_numpy(features), torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(seed)
    start, cpu = time.perf_counter(), time.process_time()
    for s in range(0, len(y), 10):
        xb, yb = x[s : s + 10], y[s : s + 10]
        if s:
            j = torch.randint(0, s, (10,), generator=gen)
            xb, yb = torch.cat([xb, x[j]]), torch.cat([yb, y[j]])
        loss = torch.nn.functional.cross_entropy(model(xb.float().mul_(1 / 255)), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return len(y) / (time.perf_counter() - start), len(y) / (time.process_time() - cpu)


def decoded_arrays(stream: Path) -> tuple[np.ndarray, np.ndarray]:
    with StreamReader(stream) as reader:
        samples = [decode(f.payload, reader.spec) for f in reader if isinstance(f, Frame)]
    return np.stack([s.features for s in samples]), np.array([s.label for s in samples])


def compare(
    stream: Path,
    features: np.ndarray,
    labels: np.ndarray,
    threads: int,
    repeats: int,
    variants: list[str],
) -> dict[str, object]:
    """Run every variant once per round, `repeats` rounds; best figures and ratios.

    Timed runs read `stream` through a link without its held-out set, so the process's
    CPU time is the streaming work alone; one more run per variant, with it, gives the
    accuracy.
    """
    trials: dict[str, list[float]] = {name: [] for name in ("bare", *variants)}
    cpu: dict[str, list[float]] = {name: [] for name in ("bare", *variants)}
    # The first optimizer built imports torch._dynamo (seconds of CPU): not the first
    # variant's figure.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with tempfile.TemporaryDirectory() as tmp:
        bare_stream = Path(tmp) / stream.name
        bare_stream.symlink_to(stream.resolve())
        for _ in range(repeats):
            for name in variants:
                config = ReplayConfig(
                    stream=bare_stream, memory=1000, threads=threads, **VARIANTS[name]
                )
                started = time.process_time()
                report = run_replay(config, progress=False)  # sets torch's thread count
                trials[name].append(report["samples_per_second"])
                cpu[name].append(report["samples_seen"] / (time.process_time() - started))
            wall, per_cpu = bare_loop(features, labels)
            trials["bare"].append(wall)
            cpu["bare"].append(per_cpu)
    accuracy = {
        name: round(
            run_replay(
                ReplayConfig(stream=stream, memory=1000, threads=threads, **VARIANTS[name]),
                progress=False,
            )["final_average_accuracy"],
            4,
        )
        for name in variants
    }
    return {
        "threads": threads,
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "wall": summary(trials),
        # With 1 thread, CPU time is what the work cost, whatever else the machine ran.
        "cpu": summary(cpu),
        "final_average_accuracy": accuracy,
    }


def summary(trials: dict[str, list[float]]) -> dict[str, object]:
    """Best samples/s per variant, the ratios of the bests and the medians of per-round ratios."""
    best = {name: max(values) for name, values in trials.items()}
    ratios = [(ratio, top, bottom) for ratio, (top, bottom) in RATIOS.items() if top in trials]
    return {
        "samples_per_second": {name: round(value, 1) for name, value in best.items()},
        "ratios_of_best": {
            ratio: round(best[top] / best[bottom], 3)
            for ratio, top, bottom in ratios
            if bottom in best
        },
        "ratios_median_per_round": {
            ratio: round(
                statistics.median(a / b for a, b in zip(trials[top], trials[bottom], strict=True)),
                3,
            )
            for ratio, top, bottom in ratios
            if bottom in trials
        },
        "trials": {name: [round(v) for v in values] for name, values in trials.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", type=Path, help="stream file (default: build Split FMNIST)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; best of N")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="of: " + ", ".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        stream = args.stream
        if stream is None:
            stream = Path(tmp) / "split-fmnist.scs"
            write(build(load("fashion-mnist"), ScenarioConfig(tasks=5, seed=0)), stream)
        features, labels = decoded_arrays(stream)
        rows = []
        for threads in (int(t) for t in args.threads.split(",")):
            rows.append(compare(stream, features, labels, threads, args.repeats, variants))
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "benchmark": "ER-1000 on Split Fashion-MNIST (5x2, batch 10, MLP 256x2, single pass)",
        "command": "python benchmarks/throughput.py "
        f"--threads {args.threads} --repeats {args.repeats} --variants {args.variants}",
        "variants": {name: VARIANTS[name] for name in variants},
        "results": rows,
        "machine": machine(),
    }
    write_results(args.out, result)


if __name__ == "__main__":
    main()
