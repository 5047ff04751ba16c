"""ER-1000 throughput of `streamcl replay` against a bare PyTorch loop, in one run.

The bare loop does the same arithmetic (same MLP, same optimizer, 10 new + 10 replayed
samples per step) with none of streamcl's decoding, validation, memory or metrics.
Both run at 1 and 2 intra-op threads, alternating, best of --repeats trials each
(machines are shared and noisy). streamcl's figure excludes held-out probe
evaluation, which it reports separately. Writes benchmarks/results/throughput.json.

    python benchmarks/throughput.py [--stream PATH] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from streamcl.deploy.runtime.config import ReplayConfig
from streamcl.deploy.runtime.replay import run_replay
from streamcl.ingest.codec import decode
from streamcl.ingest.datasets import load
from streamcl.ingest.recorded import Frame, StreamReader
from streamcl.ingest.scenarios import ScenarioConfig, build, write
from streamcl.learner.models import mlp

RESULTS = Path(__file__).parent / "results" / "throughput.json"


def bare_loop(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """The reference: 15 lines of PyTorch; returns samples/second."""
    torch.manual_seed(seed)
    model = mlp(features.shape[1:], 10, (256, 256))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.from_numpy(features), torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for s in range(0, len(y), 10):
        xb, yb = x[s : s + 10], y[s : s + 10]
        if s:
            j = torch.randint(0, s, (10,), generator=gen)
            xb, yb = torch.cat([xb, x[j]]), torch.cat([yb, y[j]])
        loss = torch.nn.functional.cross_entropy(model(xb.float().mul_(1 / 255)), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return len(y) / (time.perf_counter() - start)


def decoded_arrays(stream: Path) -> tuple[np.ndarray, np.ndarray]:
    with StreamReader(stream) as reader:
        samples = [decode(f.payload, reader.spec) for f in reader if isinstance(f, Frame)]
    return np.stack([s.features for s in samples]), np.array([s.label for s in samples])


def compare(
    stream: Path, features: np.ndarray, labels: np.ndarray, threads: int, repeats: int
) -> dict[str, object]:
    """Alternate streamcl and the bare loop so both see the same machine noise."""
    config = ReplayConfig(stream=stream, strategy="er", memory=1000, threads=threads)
    ours, bare, accuracy = [], [], 0.0
    for _ in range(repeats):
        report = run_replay(config, progress=False)  # sets torch's thread count
        ours.append(report["samples_per_second"])
        accuracy = report["final_average_accuracy"]
        bare.append(bare_loop(features, labels))
    return {
        "threads": threads,
        "streamcl_samples_per_second": round(max(ours), 1),
        "bare_loop_samples_per_second": round(max(bare), 1),
        "ratio": round(max(ours) / max(bare), 3),
        "trials": {"streamcl": [round(v) for v in ours], "bare": [round(v) for v in bare]},
        "final_average_accuracy": round(accuracy, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", type=Path, help="stream file (default: build Split FMNIST)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=3, help="best of N alternating trials")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stream = args.stream
        if stream is None:
            stream = Path(tmp) / "split-fmnist.scs"
            write(build(load("fashion-mnist"), ScenarioConfig(tasks=5, seed=0)), stream)
        features, labels = decoded_arrays(stream)
        rows = []
        for threads in (int(t) for t in args.threads.split(",")):
            rows.append(compare(stream, features, labels, threads, args.repeats))
            print(json.dumps(rows[-1]))
    result = {
        "benchmark": "ER-1000 on Split Fashion-MNIST (5x2, batch 10, MLP 256x2, single pass)",
        "command": "python benchmarks/throughput.py",
        "results": rows,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
