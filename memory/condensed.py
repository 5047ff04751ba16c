"""Condensed exemplars: per class, a few synthetic samples that summarise its arrivals.

Each class keeps `per_class` k-means centroids (FAISS `Kmeans`) in input space. Arrivals
are staged per class; when a class has staged `stage` rows, k-means runs on the staged
rows plus the current centroids, each centroid weighted by the arrivals it already
stands for (capped at `stage`, so old data never freezes the summary), starting from the
current centroids. Cost: one k-means of `stage + per_class` points every `stage`
arrivals of a class, `iterations` passes each: about 1 ms per 100 arrivals at 784
features (benchmarks/memory.py). Centroids are replayed like raw exemplars: at
a small budget a handful of class means covers a class better than the same number of
random samples (the issue's "distribution matching", done here by k-means, not by
learning synthetic images through an embedding network).
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import torch

from streamcl.ingest.errors import ConfigError


class CondensedSet:
    """`per_class` centroids `[C, per_class, *shape]` per class, in the stream dtype's units."""

    def __init__(
        self,
        num_classes: int,
        per_class: int,
        feature_shape: tuple[int, ...],
        dtype: str = "uint8",
        stage: int | None = None,
        iterations: int = 10,
        seed: int = 0,
    ):
        if per_class < 1:
            raise ConfigError(f"condensed exemplars per class must be >= 1, got {per_class}")
        self.per_class = per_class
        self.stage = stage or 20 * per_class
        if self.stage < per_class:
            raise ConfigError(f"condensed stage {self.stage} must be >= per_class {per_class}")
        self.iterations = iterations
        self.seed = seed
        self.shape = feature_shape
        self.dtype = np.dtype(dtype)
        width = int(np.prod(feature_shape))
        self.centroids = np.zeros((num_classes, per_class, width), dtype=np.float32)
        self.weight = np.zeros(num_classes)  # arrivals each class's centroids stand for
        self.tasks = np.zeros(num_classes, dtype=np.int64)  # task of the class's last arrival
        self.staged = np.zeros((num_classes, self.stage, width), dtype=np.float32)
        self.count = np.zeros(num_classes, dtype=np.int64)
        self.updates = 0

    def __len__(self) -> int:
        return int((self.weight > 0).sum()) * self.per_class

    @property
    def nbytes(self) -> int:
        return self.centroids.nbytes + self.staged.nbytes + self.weight.nbytes

    def observe(self, features: np.ndarray, labels: np.ndarray, tasks: np.ndarray) -> None:
        """Stage arrivals `[B, *shape]`; condense every class whose stage is full."""
        rows = features.reshape(len(features), -1).astype(np.float32)
        for row, label, task in zip(rows, labels.tolist(), tasks.tolist(), strict=True):
            self.staged[label, self.count[label]] = row
            self.count[label] += 1
            self.tasks[label] = task
            if self.count[label] == self.stage:
                self._condense(label)

    def _condense(self, label: int) -> None:
        points = self.staged[label]
        weights = np.ones(len(points), dtype=np.float32)
        init = None
        if self.weight[label] > 0:
            old = self.centroids[label]
            share = min(self.weight[label], self.stage) / self.per_class
            points = np.concatenate([points, old])
            weights = np.concatenate([weights, np.full(self.per_class, share, np.float32)])
            init = old
        kmeans = faiss.Kmeans(
            points.shape[1],
            self.per_class,
            niter=self.iterations,
            seed=self.seed + self.updates,
            min_points_per_centroid=1,
            max_points_per_centroid=1 << 20,
        )
        kmeans.train(np.ascontiguousarray(points), weights=weights, init_centroids=init)
        self.centroids[label] = kmeans.centroids
        self.weight[label] += self.stage
        self.count[label] = 0
        self.updates += 1

    def items(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features `[M, *shape]` (stream dtype), labels and tasks `[M]` of condensed classes."""
        classes = np.flatnonzero(self.weight > 0)
        flat = self.centroids[classes].reshape(-1, self.centroids.shape[2])
        if self.dtype.kind in "ui":
            info = np.iinfo(self.dtype)
            flat = np.clip(np.rint(flat), info.min, info.max)
        features = flat.astype(self.dtype).reshape(-1, *self.shape)
        labels = np.repeat(classes, self.per_class).astype(np.int64)
        return features, labels, np.repeat(self.tasks[classes], self.per_class)

    def state_dict(self) -> dict[str, Any]:
        return {
            "centroids": torch.from_numpy(self.centroids.copy()),
            "weight": torch.from_numpy(self.weight.copy()),
            "tasks": torch.from_numpy(self.tasks.copy()),
            "staged": torch.from_numpy(self.staged.copy()),
            "count": torch.from_numpy(self.count.copy()),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.centroids = state["centroids"].numpy().copy()
        self.weight = state["weight"].numpy().copy()
        self.tasks = state["tasks"].numpy().copy()
        self.staged = state["staged"].numpy().copy()
        self.count = state["count"].numpy().copy()
        self.updates = int(state["updates"])
