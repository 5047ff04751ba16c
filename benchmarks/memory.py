"""The FAISS-indexed replay memory: index cost, and accuracy of its policies and heads.

    python benchmarks/memory.py [--seeds 0,1,2] [--samples-per-task N] [--skip-accuracy]
        [--skip-latency] [--index-cost] [--condensed-cost] [--only 'run,run']

Latency: `EmbeddingIndex` at 1k / 10k / 100k items (flat up to 20k, IVF past it, and
flat forced at 100k for comparison), dim 128 and 256 (MLP-256's penultimate features,
the memory's default embedding): one write of 10 slots (evicting their old rows) and
one search of 10 queries for 10 neighbours, as one replay step does.
Accuracy: `streamcl replay` on Split Fashion-MNIST 5x2, one pass, batch 10, memory 1000,
defaults otherwise (class-balanced insertion, uniform retrieval, softmax), against one
change at a time; and a tiny memory (100 items, 10 per class) of raw exemplars against
one partly made of condensed exemplars (k-means centroids, or DM-refined), with the
defaults and with plain ER (PLAIN_LEARNING); index-based settings with
the memory's default embedding (penultimate features) and with pooled inputs. The
`knn`/`ncm` head runs train exactly as the default run does (the head only predicts),
so their samples/s against the default's is the index's cost (`--index-cost` times
every memory-1000 choice against the default in paired trials: embedding each batch,
the refresh budget, boundary re-embeds, and each policy's own work).
Writes benchmarks/results/memory.json (full stream) or memory-N-per-task.json (a subset).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamcl.deploy.runtime.config import PLAIN_LEARNING, ReplayConfig
from streamcl.deploy.runtime.replay import run_replay
from streamcl.ingest.datasets import load
from streamcl.ingest.scenarios import ScenarioConfig, build, write
from streamcl.memory.index import EmbeddingIndex, set_threads

RESULTS = Path(__file__).parent / "results"
DIMS = (128, 256)
"""Latency dims: 128, and the default model's (MLP-256) penultimate feature width."""
INPUT = {"memory_embedding": "input"}
KMEANS = {"memory": 100, "memory_condensed_steps": 0}
"""Condensed exemplars as k-means centroids only, no distribution-matching steps."""
DM = {"memory": 100, "memory_condensed_steps": 5}
"""k-means centroids refined by 5 distribution-matching steps per update of a class."""
RUNS: dict[str, dict[str, Any]] = {
    "default (class-balanced, uniform, softmax)": {},
    "retrieval class-balanced": {"memory_retrieval": "class-balanced"},
    "retrieval neighbours": {"memory_retrieval": "neighbours"},
    "retrieval neighbours, input embedding": {"memory_retrieval": "neighbours", **INPUT},
    "retrieval interfered": {"memory_retrieval": "interfered"},
    "insertion dedup 0.5": {"memory_dedup": 0.5},
    "insertion dedup 0.5, input embedding": {"memory_dedup": 0.5, **INPUT},
    "head ncm": {"predict_head": "ncm"},
    "head ncm, input embedding": {"predict_head": "ncm", **INPUT},
    "head knn": {"predict_head": "knn"},
    "head knn, input embedding": {"predict_head": "knn", **INPUT},
    "tiny: 100 raw": {"memory": 100},
    "tiny: 50 raw + 5 k-means per class": KMEANS | {"memory_condensed": 5},
    "tiny: 10 raw + 9 k-means per class": KMEANS | {"memory_condensed": 9},
    "tiny: 10 raw + 9 k-means + DM per class": DM | {"memory_condensed": 9},
    # Plain ER (no filter, ER-ACE or logit adjustment): what the memory's contents alone
    # are worth; ER-ACE and logit adjustment make a tiny raw memory forget less by themselves.
    "tiny plain ER: 100 raw": PLAIN_LEARNING | {"memory": 100},
    "tiny plain ER: 10 raw + 9 k-means per class": PLAIN_LEARNING
    | KMEANS
    | {"memory_condensed": 9},
}


def unit_rows(n: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit rows around random centres: clustered, as class features are (uniformly random
    rows in 128+ dims have no near neighbours, the worst case for any IVF index)."""
    rows = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.normal(
        size=(n, centres.shape[1])
    ).astype(np.float32)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def latency(items: int, dim: int, kind: str = "auto", steps: int = 200) -> dict[str, Any]:
    """Median microseconds per replay step: write 10 slots (evicting their rows) and search
    10 queries for 10 neighbours, in the index `kind` that `items` gets (auto) or forced;
    recall@10 of those searches against brute force over the same rows."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(100, dim)).astype(np.float32) / np.sqrt(dim) * 3
    index = EmbeddingIndex(items, dim, kind=kind)  # type: ignore[arg-type]
    start = time.perf_counter()
    for lo in range(0, items, 1000):
        slots = np.arange(lo, min(lo + 1000, items))
        index.write(slots, unit_rows(len(slots), centres, rng))
    fill = time.perf_counter() - start
    start = time.perf_counter()
    index.search(unit_rows(1, centres, rng), 1)  # IVF trains its lists at the first search
    train = time.perf_counter() - start
    writes, searches, recalls = [], [], []
    for _ in range(steps):
        slots = rng.choice(items, 10, replace=False)
        rows, queries = unit_rows(10, centres, rng), unit_rows(10, centres, rng)
        t0 = time.perf_counter()
        index.write(slots, rows)
        t1 = time.perf_counter()
        _, found = index.search(queries, 10)
        searches.append(time.perf_counter() - t1)
        writes.append(t1 - t0)
        if len(recalls) < 20:
            exact = np.argsort(-(queries @ index.embeddings.T), axis=1)[:, :10]
            recalls += [len(set(a) & set(b)) / 10 for a, b in zip(found, exact, strict=True)]
    return {
        "items": items,
        "dim": dim,
        "backend": index.backend,
        "fill_seconds": round(fill, 4),
        "first_search_seconds (IVF: training)": round(train, 4),
        "write_10_us_median": round(statistics.median(writes) * 1e6, 1),
        "search_10x10_us_median": round(statistics.median(searches) * 1e6, 1),
        "recall_at_10": round(float(np.mean(recalls)), 3),
        "index_bytes": index.nbytes,
    }


POLICIES = [
    "default (class-balanced, uniform, softmax)",
    "retrieval class-balanced",
    "retrieval neighbours",
    "retrieval interfered",
    "insertion dedup 0.5",
    "head ncm",
    "head knn",
]
"""The memory-1000 choices the issue compares. The others index penultimate features
of every stored item; the default indexes pooled inputs only for the kNN noise filter
(on by default with ER since the memory gate; before, the default had no index)."""


def index_cost(trials: int = 3) -> dict[str, Any]:
    """ER-1000 samples/s of each of `POLICIES`, best of alternating trials on a
    2,000-per-task stream (the machine is shared, so only paired figures compare), and
    each one's throughput as a share of the default's."""
    best = dict.fromkeys(POLICIES, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        stream = Path(tmp) / "split-fmnist-2000.scs"
        scenario = ScenarioConfig(tasks=5, seed=0, samples_per_task=2000)
        write(build(load("fashion-mnist"), scenario), stream)
        for _ in range(trials):
            for name in POLICIES:
                config = ReplayConfig(stream=stream, threads=1, memory=1000, **RUNS[name])
                speed = run_replay(config, progress=False)["samples_per_second"]
                best[name] = max(best[name], round(speed, 1))
    default = best[POLICIES[0]]
    share = {name: round(best[name] / default, 3) for name in POLICIES}
    return {"trials": trials, "best_samples_per_second": best, "share_of_default": share}


def condensed_cost(trials: int = 3) -> dict[str, Any]:
    """Samples/s of the tiny memory (100) with raw items only, with 9 k-means condensed
    exemplars per class, and with those refined by DM: best of alternating trials on a
    2,000-per-task stream (the machine is shared, so only paired figures compare)."""
    settings = {
        "raw": {"memory": 100},
        "k-means": KMEANS | {"memory_condensed": 9},
        "k-means + DM": DM | {"memory_condensed": 9},
    }
    best = dict.fromkeys(settings, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        stream = Path(tmp) / "split-fmnist-2000.scs"
        scenario = ScenarioConfig(tasks=5, seed=0, samples_per_task=2000)
        write(build(load("fashion-mnist"), scenario), stream)
        for _ in range(trials):
            for name, run in settings.items():
                config = ReplayConfig(stream=stream, threads=1, **run)
                speed = run_replay(config, progress=False)["samples_per_second"]
                best[name] = max(best[name], round(speed, 1))
    slowdown = {name: round(best["raw"] / best[name], 2) for name in settings}
    return {"trials": trials, "best_samples_per_second": best, "slowdown_vs_raw": slowdown}


def accuracy(stream: Path, seeds: list[int], names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        settings = RUNS[name]
        for seed in seeds:
            settings = {"memory": 1000, **settings}
            config = ReplayConfig(stream=stream, seed=seed, threads=1, **settings)
            report = run_replay(config, progress=False)
            rows.append(
                {
                    "run": name,
                    "settings": settings,
                    "seed": seed,
                    "final_average_accuracy": round(report["final_average_accuracy"], 4),
                    "average_forgetting": round(report["average_forgetting"], 4),
                    "samples_per_second": round(report["samples_per_second"], 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def run_names(text: str) -> list[str]:
    """`--only`'s comma-separated names; some names hold commas, so pieces are joined
    until they make a known name."""
    names, part = [], ""
    for piece in text.split(","):
        part = f"{part},{piece}" if part else piece
        if part.strip() in RUNS:
            names.append(part.strip())
            part = ""
    if part:
        raise SystemExit(f"--only: unknown run {part.strip()!r}; known: {', '.join(RUNS)}")
    return names


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name in RUNS:
        mine = [r for r in rows if r["run"] == name]
        if not mine:
            continue
        acc = [r["final_average_accuracy"] for r in mine]
        out.append(
            {
                "run": name,
                "seeds": len(mine),
                "accuracy_mean": round(statistics.mean(acc), 4),
                "accuracy_sd": round(statistics.stdev(acc), 4) if len(acc) > 1 else None,
                "forgetting_mean": round(statistics.mean(r["average_forgetting"] for r in mine), 4),
                "samples_per_second_mean": round(
                    statistics.mean(r["samples_per_second"] for r in mine), 1
                ),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="learner seeds, comma separated")
    parser.add_argument("--samples-per-task", type=int, default=None, help="subset per task")
    parser.add_argument(
        "--skip-accuracy", action="store_true", help="keep the file's accuracy runs"
    )
    parser.add_argument("--skip-latency", action="store_true", help="keep the file's latency")
    parser.add_argument(
        "--index-cost",
        action="store_true",
        help="also time each memory-1000 policy against the default",
    )
    parser.add_argument(
        "--condensed-cost", action="store_true", help="also time condensed exemplars"
    )
    parser.add_argument(
        "--only", default=None, help="rerun these runs (comma separated), keep the file's others"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    set_threads(1)
    per_task = args.samples_per_task
    path = RESULTS / ("memory.json" if per_task is None else f"memory-{per_task}-per-task.json")
    earlier: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    command = "python benchmarks/memory.py " + " ".join(
        [f"--seeds {args.seeds}"]
        + ([f"--samples-per-task {per_task}"] if per_task else [])
        + (["--skip-accuracy"] if args.skip_accuracy else [])
        + (["--skip-latency"] if args.skip_latency else [])
        + ([f"--only '{args.only}'"] if args.only else [])
        + (["--index-cost"] if args.index_cost else [])
        + (["--condensed-cost"] if args.condensed_cost else [])
    )
    result: dict[str, Any] = {
        **earlier,  # sections not rerun keep their earlier figures
        "benchmark": __doc__.splitlines()[0],
        "command": f"{earlier['command']}; then {command}" if earlier else command,
        "torch": torch.__version__,
    }
    if not args.skip_latency:
        result["latency"] = [latency(n, d) for n in (1000, 10_000, 100_000) for d in DIMS] + [
            latency(100_000, d, kind="flat")
            for d in DIMS  # what IVF saves past the limit
        ]
        for row in result["latency"]:
            print(json.dumps(row), flush=True)
    if args.index_cost:
        result["index_cost"] = index_cost()
        print(json.dumps(result["index_cost"]), flush=True)
    if args.condensed_cost:
        result["condensed_cost"] = condensed_cost()
        print(json.dumps(result["condensed_cost"]), flush=True)
    if not args.skip_accuracy:
        seeds = [int(s) for s in args.seeds.split(",")]
        with tempfile.TemporaryDirectory() as tmp:
            stream = Path(tmp) / "split-fmnist.scs"
            scenario = ScenarioConfig(tasks=5, seed=0, samples_per_task=per_task)
            write(build(load("fashion-mnist"), scenario), stream)
            names = run_names(args.only) if args.only else list(RUNS)
            rows = accuracy(stream, seeds, names)
        if args.only:  # keep the earlier runs of the other settings
            rows = [r for r in earlier.get("runs", []) if r["run"] not in names] + rows
        result["stream"] = (
            f"Split Fashion-MNIST 5x2, stream seed 0, {per_task or 'all'} samples per task"
        )
        result["runs"] = rows
        result["summary"] = summarise(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
