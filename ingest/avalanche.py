"""The Avalanche bridge: benchmarks in as recorded streams, recorded streams out as benchmarks.

Avalanche (avalanche-lib 0.6) needs torchvision, which the core install leaves out: this
module is imported only on demand and says which extra to install when it is missing.

- `import_benchmark` takes any benchmark's train stream in its order as the stream (the
  experience index becomes the task id) and its test stream as the held-out set (grouped
  by test experience).
- `load_benchmark` turns an `.npz` written by `stream export` back into a benchmark: one
  experience per value of its `experiences` array, the held-out set as the test stream.
- `online_experiences` cuts an experience into mini-experiences the way Avalanche's
  `split_online_stream` does, without two of its 0.6.0 faults (see its docstring).
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from streamcl.ingest.errors import ConfigError, DataError
from streamcl.ingest.importers import from_arrays
from streamcl.ingest.scenarios import BuiltStream

log = logging.getLogger(__name__)
CLASSIC = "avalanche:"
INSTALL_HINT = "pip install 'streamcl[avalanche]' (avalanche-lib 0.6 with torchvision)"


def require_avalanche() -> Any:
    """Import avalanche, or fail with one line saying how to get it."""
    try:
        return importlib.import_module("avalanche")
    except ImportError as err:
        message = f"the Avalanche bridge needs avalanche-lib: {INSTALL_HINT} ({err})"
        raise ConfigError(message) from err


def resolve(source: str, kwargs: Mapping[str, Any]) -> Any:
    """'avalanche:SplitFMNIST' or 'package.module:function' called with `kwargs`."""
    if source.startswith(CLASSIC):
        module_name, attr = "avalanche.benchmarks.classic", source[len(CLASSIC) :]
    else:
        module_name, sep, attr = source.partition(":")
        if not sep or not module_name or not attr:
            raise ConfigError(
                f"benchmark source must be a .npz file, 'avalanche:NAME' or "
                f"'package.module:function', got {source!r}"
            )
    require_avalanche()
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot find benchmark {source!r}: {err}") from err
    try:
        return factory(**kwargs)
    except (TypeError, ValueError, OSError, RuntimeError) as err:
        raise DataError(f"benchmark {source!r} failed with {dict(kwargs)}: {err}") from err


def import_benchmark(
    source: str | Any, kwargs: Mapping[str, Any] | None = None, num_classes: int | None = None
) -> BuiltStream:
    """A benchmark (object, or a `resolve` source) as a stream: train order kept exactly."""
    benchmark = resolve(source, kwargs or {}) if isinstance(source, str) else source
    features, labels, tasks = stream_arrays(benchmark.train_stream)
    eval_features, eval_labels, eval_tasks = stream_arrays(benchmark.test_stream)
    name = source if isinstance(source, str) else type(benchmark).__name__
    arrays = {
        "features": features,
        "labels": labels,
        "tasks": tasks,
        "eval_features": eval_features,
        "eval_labels": eval_labels,
        "eval_tasks": eval_tasks,
    }
    meta = {"avalanche_benchmark": name, "benchmark_args": dict(kwargs or {})}
    return from_arrays(arrays, num_classes=num_classes, source=name, meta=meta)


def stream_arrays(stream: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, labels and experience index of every sample of an Avalanche stream, in order."""
    features, labels, experiences = [], [], []
    for index, experience in enumerate(stream):
        for item in experience.dataset:
            features.append(as_array(item[0]))
            labels.append(int(item[1]))
            experiences.append(index)
    if not labels:
        raise DataError(f"the benchmark's {getattr(stream, 'name', '')} stream holds no samples")
    try:
        stacked = np.stack(features)
    except ValueError as err:
        raise DataError(f"the benchmark's samples differ in shape: {err}") from err
    return stacked, np.array(labels, np.int64), np.array(experiences, np.int64)


def as_array(x: Any) -> np.ndarray:
    """A PIL image stays uint8; a tensor keeps its dtype (float32 after the usual transforms)."""
    if hasattr(x, "detach"):
        return np.asarray(x.detach().cpu().numpy())
    return np.asarray(x)


def load_benchmark(path: str | Path, task_labels: bool = False) -> Any:
    """A benchmark from a `stream export` file: train experiences in stream order, test stream.

    Features are given to Avalanche as stored (uint8 is scaled to [0, 1] float32, as the
    streamcl learner sees it). With `task_labels`, the stream's task ids become the
    experiences' task labels; by default every task label is 0 (class-incremental).
    The test stream has one experience per held-out task group, or one in all.
    """
    require_avalanche()
    import torch
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset

    def dataset(x: np.ndarray, y: np.ndarray, t: np.ndarray) -> Any:
        tensor = torch.from_numpy(x)
        tensor = tensor.float().div_(255) if x.dtype == np.uint8 else tensor
        tasks = t.tolist() if task_labels else 0
        return _make_taskaware_tensor_classification_dataset(
            tensor, torch.from_numpy(y), task_labels=tasks
        )

    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    if "experiences" not in arrays:
        raise DataError(f"{path} has no 'experiences' array: write it with `stream export`")
    features, labels, experiences = arrays["features"], arrays["labels"], arrays["experiences"]
    tasks = arrays.get("tasks", np.zeros(len(labels), np.int64))
    train = [
        dataset(features[rows], labels[rows], tasks[rows])
        for rows in (np.flatnonzero(experiences == e) for e in np.unique(experiences))
    ]
    test = []
    if "eval_features" in arrays:
        ex, ey = arrays["eval_features"], arrays["eval_labels"]
        groups = arrays.get("eval_tasks", np.zeros(len(ey), np.int64))
        for g in np.unique(groups):
            rows = np.flatnonzero(groups == g)
            test.append(dataset(ex[rows], ey[rows], np.full(len(rows), g)))
    return benchmark_from_datasets(train=train, test=test)


def online_experiences(experience: Any, size: int) -> Iterator[Any]:
    """Mini-experiences of `size` samples of one experience, in arrival order.

    Avalanche 0.6.0's `split_online_stream` gets two things wrong that change its numbers:
    `is_last_subexp` is never set when the experience length is a multiple of `size`
    (replay buffers and GDumb never see the end of an experience), and each
    mini-experience is numbered by its position in the online stream, so forgetting
    metrics keyed by experience id read 0. Here the last one is flagged whatever the
    length, and each keeps its origin experience's id. No shuffling: the stream's order
    is the experiment.
    """
    from avalanche.benchmarks.scenarios.online import OnlineCLExperience

    data, origin = experience.dataset, experience.current_experience
    count = math.ceil(len(data) / size)
    for k in range(count):
        mini = OnlineCLExperience(
            dataset=data.subset(range(k * size, min(len(data), (k + 1) * size))),
            origin_experience=experience,
            is_first_subexp=k == 0,
            is_last_subexp=k == count - 1,
            sub_stream_length=count,
            access_task_boundaries=False,
        )
        mini.current_experience = origin
        mini.origin_stream = experience.origin_stream
        yield mini
