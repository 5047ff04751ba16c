"""streamcl against Avalanche 0.6 strategies on the very same recorded streams, in one run.

    .venv-avalanche/bin/python benchmarks/vs_avalanche.py [--seeds 0,1,2]
        [--streams clean,noise40,imbalance10,noise40-imbalance10] [--samples-per-task N]
        [--stream-seed 0]

Needs the 'avalanche' extra (tests/run.sh builds .venv-avalanche). Each stream is built
once by streamcl (Split Fashion-MNIST, 5 tasks x 2 classes, stream seed 0 unless
--stream-seed says otherwise: it draws the class order, noise and imbalance), recorded,
exported with `stream export` and loaded with `streamcl.ingest.avalanche.load_benchmark`, so both
libraries see the same samples in the same order, scaled the same way to [0, 1]. Same
model (MLP 256x2, seeded init), SGD lr 0.1, mini-batch 10, one pass, 10 replayed samples
per step, 1 PyTorch thread, all in this one process. Both are scored by the same code:
accuracy on each task's held-out test split after each task (streamcl's evaluation
points; for Avalanche, after each experience's last mini-experience), then
`streamcl.evaluation.metrics` for final average accuracy and average forgetting. Samples/second
counts training only; peak RSS is the process's resident set sampled during the run
(one process holds both libraries, so it compares runs, not absolute footprints).

Avalanche 0.6.0 faults handled here:
- `split_online_stream` never sets `is_last_subexp` when an experience's length is a
  multiple of the mini-batch (10: every balanced task here), and renumbers the
  mini-experiences, so experience-keyed state (forgetting, per-experience plugins) reads
  the mini-batch index: `streamcl.ingest.avalanche.online_experiences` flags the last one and
  keeps the origin experience id, and it does not shuffle (the arrival order is the
  experiment).
- Forgetting: computed from the accuracy matrix with streamcl's definitions, not from
  Avalanche's metric plugins (whose forgetting reads 0 when mini-experiences renumber).
- Its `ClassBalancedBuffer` re-subsets every class it sees in a mini-batch; under label
  noise every class is in nearly every mini-batch, so each step rebuilds all ten class
  buffers instead of two. It is used as is (replacing it would no longer measure
  Avalanche), and the table's samples/second on the noisy streams show the cost.
- Its `ReservoirSamplingBuffer` concatenates the mini-experience with the buffer and
  subsets the result at every step (about 280 samples/s here, against 1,800 for the
  class-balanced buffer); also used as is.

Strategies: Avalanche naive and replay (class-balanced buffer of 500 and 1000, 10
replayed per step; "x3": 30, as streamcl's "ER-1000 x3"; "reservoir": its reservoir
sampling buffer instead, as streamcl's "ER-1000 reservoir") on online mini-experiences of
10; online EWC on whole experiences, one pass, unshuffled, batch 10 (its importances
need an experience's data, 0.6.0 has no streaming Fisher); GDumb (1000, class-balanced,
retrained from memory for --gdumb-epochs at each experience end); joint: one pass over
the whole training set shuffled (i.i.d. upper reference).
streamcl: naive, ER-500, ER-1000 (class-balanced; "x3": three draws per new sample, its
default; "reservoir": reservoir insertion, as ER was published), online EWC, all with
plain cross entropy (`PLAIN_LEARNING`: no noise filter, ER-ACE or logit adjustment), the
same algorithms as their Avalanche rows; and its
defaults (ER-1000 x3 with the kNN and small-loss noise filters, quarantine, the memory
gate, ER-ACE and balanced-softmax logit adjustment), as `streamcl replay` runs with no
flags.
Writes benchmarks/results/vs_avalanche.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from _report import machine, write_results

from streamcl.deploy.runtime.config import PLAIN_LEARNING, ReplayConfig
from streamcl.deploy.runtime.replay import run_replay
from streamcl.evaluation import metrics
from streamcl.ingest.avalanche import load_benchmark, online_experiences
from streamcl.ingest.datasets import load
from streamcl.ingest.exporters import export_npz
from streamcl.ingest.scenarios import ScenarioConfig, build, write
from streamcl.learner.models import mlp

warnings.filterwarnings("ignore")
# Avalanche's @deprecated (its replay plugin calls a deprecated buffer update each step)
# re-enables its warning on every call; the table is the output, not those lines.
warnings.showwarning = lambda *args, **kwargs: None
RESULTS = Path(__file__).parent / "results" / "vs_avalanche.json"
STREAMS = {
    "clean": {},
    "noise40": {"noise": 0.4},
    "imbalance10": {"imbalance": 10.0},
    "noise40-imbalance10": {"noise": 0.4, "imbalance": 10.0},
}
BATCH, LR, HIDDEN = 10, 0.1, (256, 256)
ER_1000 = {**PLAIN_LEARNING, "strategy": "er", "memory": 1000}
"""streamcl's ER-1000 as shipped: three draws per new sample, class-balanced insertion."""
ONE_DRAW = {"replay_size": BATCH}
"""As Avalanche's replay: one draw per new sample."""
RESERVOIR = {"memory_policy": "reservoir"}
"""Reservoir insertion, as ER was published (against Avalanche's reservoir buffer)."""
STREAMCL = {
    "streamcl naive": {**PLAIN_LEARNING, "strategy": "naive"},
    "streamcl ER-500": {**ER_1000, "memory": 500, **ONE_DRAW},
    "streamcl ER-1000": {**ER_1000, **ONE_DRAW},
    "streamcl ER-1000 x3": ER_1000,  # against Avalanche's replay x3
    "streamcl ER-1000 reservoir": {**ER_1000, **RESERVOIR, **ONE_DRAW},
    "streamcl ER-1000 reservoir x3": {**ER_1000, **RESERVOIR},
    "streamcl EWC": {**PLAIN_LEARNING, "strategy": "ewc"},
    "streamcl defaults": {},
}
AVALANCHE = (
    "avalanche naive",
    "avalanche replay-500",
    "avalanche replay-1000",
    "avalanche replay-1000 x3",
    "avalanche replay-1000 reservoir",
    "avalanche replay-1000 reservoir x3",
    "avalanche EWC",
    "avalanche GDumb-1000",
    "avalanche joint",
)


@contextmanager
def peak_rss() -> Iterator[dict[str, float]]:
    """Sample this process's RSS every 20 ms; yields a dict filled with 'peak_mb' at exit."""
    process, result, done = psutil.Process(), {"peak_mb": 0.0}, threading.Event()

    def sample() -> None:
        while not done.is_set():
            result["peak_mb"] = max(result["peak_mb"], process.memory_info().rss / 2**20)
            done.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()


def run_streamcl(stream: Path, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    config = ReplayConfig(stream=stream, seed=seed, threads=1, **settings)
    with peak_rss() as rss:
        report = run_replay(config, progress=False)
    return {
        "final_average_accuracy": report["final_average_accuracy"],
        "average_forgetting": report["average_forgetting"],
        "samples_per_second": report["samples_per_second"],
        "peak_rss_mb": rss["peak_mb"],
    }


def accuracy_row(model: torch.nn.Module, test_stream: Any) -> np.ndarray:
    """Accuracy on each test experience (a task's held-out split), one forward pass each."""
    model.eval()
    row = []
    with torch.no_grad():
        for experience in test_stream:
            data = experience.dataset
            x = torch.stack([data[i][0] for i in range(len(data))])
            y = torch.as_tensor([int(data[i][1]) for i in range(len(data))])
            row.append(float((model(x).argmax(1) == y).float().mean()))
    model.train()
    return np.array(row)


def make_strategy(name: str, model: torch.nn.Module) -> Any:
    from avalanche.training.plugins import ReplayPlugin
    from avalanche.training.storage_policy import ClassBalancedBuffer, ReservoirSamplingBuffer
    from avalanche.training.supervised import EWC, GDumb, Naive

    common = {
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=LR),
        "criterion": torch.nn.CrossEntropyLoss(),
        "train_mb_size": BATCH,
        "train_epochs": 1,
        "eval_mb_size": 1000,
        "device": "cpu",
        "evaluator": None,
    }
    if name.startswith("avalanche replay-"):  # "avalanche replay-SIZE [reservoir] [xK]"
        size, *options = name.removeprefix("avalanche replay-").split()
        times = next((int(o[1:]) for o in options if o.startswith("x")), 1)
        buffer = (
            ReservoirSamplingBuffer(int(size))
            if "reservoir" in options
            else ClassBalancedBuffer(int(size), adaptive_size=True)
        )
        replayed = BATCH * times
        plugin = ReplayPlugin(int(size), batch_size_mem=replayed, storage_policy=buffer)
        return Naive(**common, plugins=[plugin])
    if name == "avalanche EWC":
        # Avalanche's penalty is lambda * F * d^2, streamcl's lambda/2 * F * d^2 (lambda 100).
        return EWC(ewc_lambda=50.0, mode="online", decay_factor=1.0, **common)
    if name == "avalanche GDumb-1000":
        return GDumb(mem_size=1000, **{**common, "train_epochs": GDUMB_EPOCHS})
    return Naive(**common)


GDUMB_EPOCHS = 5


def run_avalanche(name: str, benchmark_path: Path, seed: int) -> dict[str, Any]:
    benchmark = load_benchmark(benchmark_path)
    torch.manual_seed(seed)
    model = mlp((28, 28), 10, HIDDEN)
    strategy = make_strategy(name, model)
    rows, seconds, samples = [], 0.0, 0

    def timed(step: Callable[[], Any], count: int) -> None:
        nonlocal seconds, samples
        started = time.perf_counter()
        step()
        seconds += time.perf_counter() - started
        samples += count

    with peak_rss() as rss:
        if name == "avalanche joint":
            from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
            from avalanche.benchmarks.utils import concat_datasets

            whole = concat_datasets([e.dataset for e in benchmark.train_stream])
            order = torch.randperm(len(whole), generator=torch.Generator().manual_seed(seed))
            shuffled = benchmark_from_datasets(train=[whole.subset(order.tolist())])
            experience = shuffled.train_stream[0]
            timed(lambda: strategy.train(experience, shuffle=False), len(whole))
            rows.append(accuracy_row(strategy.model, benchmark.test_stream))
        else:
            online = name in ("avalanche naive",) or name.startswith("avalanche replay")
            for experience in benchmark.train_stream:
                n = len(experience.dataset)
                if online:
                    for mini in online_experiences(experience, BATCH):
                        timed(lambda mini=mini: strategy.train(mini), len(mini.dataset))
                else:  # EWC: one unshuffled pass; GDumb: shuffled epochs over its memory
                    shuffle = name == "avalanche GDumb-1000"
                    timed(lambda e=experience, s=shuffle: strategy.train(e, shuffle=s), n)
                rows.append(accuracy_row(strategy.model, benchmark.test_stream))
    return {
        **scores(np.array(rows), joint=name == "avalanche joint"),
        "samples_per_second": samples / seconds,
        "peak_rss_mb": rss["peak_mb"],
    }


def scores(matrix: np.ndarray, joint: bool) -> dict[str, float | None]:
    """streamcl's definitions on the matrix: row i is after task i, column g is task g."""
    last = matrix.shape[0] - 1
    groups = matrix.shape[1]
    seen = np.ones(groups, bool) if joint else np.arange(groups) <= last
    newest = np.zeros(groups, bool) if joint else np.arange(groups) == last
    return {
        "final_average_accuracy": metrics.average_accuracy(matrix[last], seen),
        "average_forgetting": None
        if joint
        else metrics.average_forgetting(matrix, last, seen, newest),
    }


def build_streams(
    names: list[str], samples_per_task: int | None, tmp: Path, stream_seed: int = 0
) -> dict[str, tuple[Path, Path]]:
    """Each stream recorded by streamcl and exported for Avalanche: (stream, export)."""
    data = load("fashion-mnist")
    built = {}
    for name in names:
        config = ScenarioConfig(
            tasks=5, seed=stream_seed, samples_per_task=samples_per_task, **STREAMS[name]
        )
        stream, exported = tmp / f"{name}.scs", tmp / f"{name}.npz"
        write(build(data, config), stream)
        export_npz(stream, exported)
        built[name] = (stream, exported)
    return built


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean (and spread) over seeds per stream and method, in run order."""
    table = []
    keys = list(dict.fromkeys((r["stream"], r["method"]) for r in rows))
    for stream, method in keys:
        runs = [r for r in rows if (r["stream"], r["method"]) == (stream, method)]
        entry: dict[str, Any] = {"stream": stream, "method": method, "seeds": len(runs)}
        for field in (
            "final_average_accuracy",
            "average_forgetting",
            "samples_per_second",
            "peak_rss_mb",
        ):
            values = [r[field] for r in runs if r[field] is not None]
            entry[field] = round(float(np.mean(values)), 4) if values else None
            if field == "final_average_accuracy":
                entry["accuracy_std"] = round(float(np.std(values)), 4)
        table.append(entry)
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    lines = [
        "| stream | method | final avg. accuracy | avg. forgetting | samples/s | peak RSS MB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for e in table:
        forgetting = "—" if e["average_forgetting"] is None else f"{e['average_forgetting']:.3f}"
        lines.append(
            f"| {e['stream']} | {e['method']} | {e['final_average_accuracy']:.3f} "
            f"± {e['accuracy_std']:.3f} | {forgetting} | {e['samples_per_second']:,.0f} "
            f"| {e['peak_rss_mb']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    global GDUMB_EPOCHS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="learner seeds, comma separated")
    parser.add_argument("--streams", default=",".join(STREAMS), help="comma separated")
    parser.add_argument("--methods", default=None, help="substring filter on method names")
    parser.add_argument("--samples-per-task", type=int, default=None, help="default: all")
    parser.add_argument(
        "--stream-seed", type=int, default=0, help="class order, noise and imbalance draws"
    )
    parser.add_argument("--gdumb-epochs", type=int, default=GDUMB_EPOCHS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    GDUMB_EPOCHS = args.gdumb_epochs
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [*STREAMCL, *AVALANCHE]
    if args.methods:
        wanted = args.methods.split(",")
        methods = [m for m in methods if any(w in m for w in wanted)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        streams = build_streams(
            args.streams.split(","), args.samples_per_task, Path(tmp), args.stream_seed
        )
        for stream_name, (stream, exported) in streams.items():
            for seed in seeds:
                for method in methods:
                    if method in STREAMCL:
                        result = run_streamcl(stream, STREAMCL[method], seed)
                    else:
                        result = run_avalanche(method, exported, seed)
                    rows.append({"stream": stream_name, "method": method, "seed": seed, **result})
                    print(json.dumps(rows[-1]), flush=True)
    table = summarise(rows)
    print(markdown(table))
    write_results(
        args.out,
        {
            "benchmark": "streamcl vs Avalanche on Split Fashion-MNIST 5x2 (batch 10, "
            "MLP 256x2, SGD lr 0.1, one pass, 1 thread, one process)",
            "command": "python benchmarks/vs_avalanche.py "
            + " ".join(
                f"--{k.replace('_', '-')} {v}"
                for k, v in vars(args).items()
                if v is not None and k != "out"
            ),
            "threads": torch.get_num_threads(),
            "machine": machine(avalanche=__import__("avalanche").__version__),
            "table": table,
            "runs": rows,
        },
    )


if __name__ == "__main__":
    main()
