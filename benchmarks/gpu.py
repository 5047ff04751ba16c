"""Samples/second and GPU utilisation of `streamcl replay`, CPU vs GPU, replay on and off.

Two workloads, each replayed from a recorded stream through `run_replay` (the API the
service's learner shares), so the learner's own device paths are what is measured:
pinned host batches with non-blocking copies (learner/loop.py `InputAdapter`) and, with
`replay+index`, the memory's FAISS index on the GPU when faiss has GPU support
(memory/index.py; faiss-cpu keeps it on the host and the row says so).

- `mlp`: the default MLP (256x2) on Split Fashion-MNIST;
- `resnet18`: a ResNet-18 (CIFAR layout: 3x3 stem, no max-pool, 11.2M weights) on
  synthetic 32x32x3 images, 10 classes.

Modes: `off` (fine-tuning, strategy naive), `on` (ER-1000), `on+index` (ER-1000 with the
memory indexed for a kNN head: per-update embedding of written rows plus the refresh
budget). Dirty-stream corrections are off (PLAIN_LEARNING) so the rows compare devices,
not filters. Held-out evaluation is not timed (the timed streams have no sidecar).

GPU utilisation is the mean of `torch.cuda.utilization()` sampled every 0.1 s during a
run (it needs pynvml; without it the figure is "n/a"). Without CUDA the GPU rows are
skipped with one line saying so, the (short) CPU rows still run, and the script exits 0.
Not measured because the learner has no such path yet: bf16 autocast and CUDA-graph
capture of the fixed-shape step (see the results' `not_in_learner`).

    python benchmarks/gpu.py [--threads 1] [--batch-sizes 10,128] [--out PATH]

Writes benchmarks/results/gpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _report import machine, write_results
from torch import nn

from streamcl.deploy.runtime.config import PLAIN_LEARNING, ReplayConfig
from streamcl.deploy.runtime.replay import run_replay
from streamcl.ingest.datasets import LabelledData, load
from streamcl.ingest.scenarios import ScenarioConfig, build, write_frames

RESULTS = Path(__file__).parent / "results" / "gpu.json"
MODES: dict[str, dict[str, Any]] = {
    "off": {"strategy": "naive"},
    "on": {"strategy": "er"},
    "on+index": {"strategy": "er", "predict_head": "knn"},
}
NO_CUDA = "no CUDA device: GPU rows skipped"
NOT_IN_LEARNER = ["bf16 autocast", "CUDA graph capture of the step"]
"""GPU techniques of issue 14 the learner does not implement yet: nothing to measure."""


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): two 3x3 convolutions and a shortcut."""

    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """ResNet-18 for `[3, 32, 32]` inputs (the streamcl model factory signature)."""
    channels = input_shape[0]
    layers: list[nn.Module] = [
        nn.Conv2d(channels, 64, 3, 1, 1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
    ]
    width = 64
    for outputs, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(width, outputs, stride), BasicBlock(outputs, outputs, 1)]
        width = outputs
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


def synthetic_images(samples_per_class: int, seed: int = 0) -> LabelledData:
    """10 classes of 32x32x3 uint8 images: a class template plus noise (learnable)."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, (10, 3, 32, 32))
    labels = np.repeat(np.arange(10), samples_per_class)
    noise = rng.integers(-64, 65, (len(labels), 3, 32, 32))
    images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
    order = rng.permutation(len(labels))
    x, y = images[order], labels[order].astype(np.int64)
    return LabelledData("synthetic-32x32x3", x, y, x[:100], y[:100], 10)


def workload_stream(model: str, samples: int, directory: Path) -> Path:
    """A recorded stream of about `samples` messages (5 tasks), without a held-out file."""
    per_task = max(1, samples // 5)
    data = load("fashion-mnist") if model == "mlp" else synthetic_images(per_task // 2 + 1)
    path = directory / f"{model}-{samples}.scs"
    write_frames(build(data, ScenarioConfig(tasks=5, samples_per_task=per_task, seed=0)), path)
    return path


class UtilisationSampler:
    """Mean `torch.cuda.utilization()` over a run, sampled every `period` seconds."""

    def __init__(self, period: float = 0.1):
        self.period = period
        self.values: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.values.append(float(torch.cuda.utilization()))

    def __enter__(self) -> UtilisationSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mean(self) -> float | None:
        return round(statistics.mean(self.values), 1) if self.values else None


def utilisation_reader() -> str | None:
    """Why GPU utilisation cannot be read here (None: it can)."""
    try:
        torch.cuda.utilization()
    except Exception as err:  # pynvml missing or NVML unusable: report, do not fail
        return f"n/a ({type(err).__name__}: {err})"
    return None


def run_row(
    stream: Path, model: str, mode: str, device: str, batch_size: int, threads: int
) -> dict[str, Any]:
    """One replay; samples/second (probe evaluation excluded) and GPU utilisation."""
    config = ReplayConfig(
        stream=stream,
        model="gpu:resnet18" if model == "resnet18" else "mlp",
        device=device,
        batch_size=batch_size,
        memory=1000,
        threads=threads,
        **PLAIN_LEARNING,
        **MODES[mode],
    )
    cuda = device == "cuda"
    unreadable = utilisation_reader() if cuda else "cpu row"
    if cuda and unreadable is None:
        with UtilisationSampler() as sampler:
            report = run_replay(config, progress=False)
        utilisation: float | str | None = sampler.mean()
    else:
        report = run_replay(config, progress=False)
        utilisation = unreadable if cuda else None
    row = {
        "model": model,
        "device": report["environment"]["device"],
        "replay": mode,
        "batch_size": batch_size,
        "samples": report["samples_seen"],
        "samples_per_second": round(report["samples_per_second"], 1),
        "gpu_utilisation_percent": utilisation,
        "pinned_non_blocking_copies": cuda,
    }
    memory = report.get("memory")
    if mode == "on+index" and isinstance(memory, dict):
        row["index_backend"] = memory.get("backend")
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch, FAISS)")
    parser.add_argument("--batch-sizes", default="10,128", help="new samples per update")
    parser.add_argument("--cpu-samples", type=int, default=2000, help="MLP stream, CPU rows")
    parser.add_argument("--gpu-samples", type=int, default=60000, help="MLP stream, GPU rows")
    parser.add_argument(
        "--cnn-samples", default="200,5000", help="ResNet-18 stream: CPU rows, GPU rows"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    cnn_cpu, cnn_gpu = (int(n) for n in args.cnn_samples.split(","))
    sys.path.insert(0, str(Path(__file__).parent))  # `gpu:resnet18` for the model factory
    skipped = None if torch.cuda.is_available() else NO_CUDA
    if skipped:
        print(skipped, flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        plan = [("cpu", "mlp", args.cpu_samples), ("cpu", "resnet18", cnn_cpu)]
        if not skipped:
            plan += [("cuda", "mlp", args.gpu_samples), ("cuda", "resnet18", cnn_gpu)]
        streams: dict[tuple[str, int], Path] = {}
        for device, model, samples in plan:
            key = (model, samples)
            if key not in streams:
                streams[key] = workload_stream(model, samples, Path(tmp))
            for batch_size in batch_sizes:
                for mode in MODES:
                    if device == "cpu" and model == "resnet18" and mode == "on+index":
                        continue  # minutes per row on one CPU thread; the GPU rows have it
                    rows.append(
                        run_row(streams[key], model, mode, device, batch_size, args.threads)
                    )
    result = {
        "benchmark": "streamcl replay samples/s: MLP on Split Fashion-MNIST, ResNet-18 on "
        "synthetic 32x32x3; CPU vs GPU; replay off / on / on with the memory index",
        "command": "python benchmarks/gpu.py "
        f"--threads {args.threads} --batch-sizes {args.batch_sizes} "
        f"--cpu-samples {args.cpu_samples} --gpu-samples {args.gpu_samples} "
        f"--cnn-samples {args.cnn_samples}",
        "gpu_skipped": skipped,
        "not_in_learner": NOT_IN_LEARNER,
        "rows": rows,
        "machine": machine(cuda=torch.cuda.get_device_name(0) if not skipped else None),
    }
    write_results(args.out, result)


if __name__ == "__main__":
    main()
