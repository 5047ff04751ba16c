"""Condensed exemplars: per class, a few synthetic samples that summarise its arrivals.

Each class keeps `per_class` synthetic samples in input space, learned by distribution
matching (DM, Zhao & Bilen, WACV 2023): they move so that their mean embedding under
a freshly sampled, randomly initialised network equals the mean embedding of the
class's recent real samples,

    min_S  E_net || mean_{x in R_c} net(x) - mean_{s in S_c} net(s) ||^2,

one random network per gradient step (a small conv net for image-shaped features,
an MLP otherwise; built here, so memory needs nothing of the learner).

Each class keeps its last `window` arrivals (a ring). Every `every` arrivals of a class
(once its window is full), an update first re-clusters the window plus the current
exemplars with k-means (FAISS `Kmeans`, starting from them, each weighted by the
arrivals it stands for, capped at `window`, so old data never freezes the summary),
then runs `steps` DM steps against the window: k-means carries the class's history,
DM refines what the centroids blur. The compute per update is bounded: one k-means of
`window + per_class` points, and `steps` forward/backward passes of `per_class`
samples plus forward passes of `REAL_BATCH` real rows. `steps = 0` is plain k-means.

Steps are normalised gradient steps of `lr` (a share of the stream's observed value
range, per pixel RMS): stateless, so a checkpoint needs no optimiser state, and the
step size does not depend on the random network's scale. Synthetic samples are
clipped to the observed value range of the stream and rounded to its dtype when
replayed, like raw exemplars.
"""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from streamcl.ingest.errors import ConfigError
from streamcl.ingest.schema import image_shape

REAL_BATCH = 64
"""Real rows of the window embedded per DM step (a fresh random subset each step)."""
WIDTHS = (8, 16)
"""Channels of the random conv net's two 3x3 layers (each followed by ReLU, 2x2 pooling)."""
MLP_WIDTH = 256
"""Hidden width of the random MLP used for non-image features."""


class RandomEmbedding:
    """A randomly initialised network `[n, D] -> [n, E]`, He-initialised from `generator`."""

    def __init__(self, width: int, image: tuple[int, int, int] | None, generator: torch.Generator):
        self.image = image
        if image is not None:
            sizes = [(WIDTHS[0], image[0]), (WIDTHS[1], WIDTHS[0])]
        else:
            sizes = [(MLP_WIDTH, width), (MLP_WIDTH, MLP_WIDTH)]
        self.weights = []
        for out, inp in sizes:
            fan_in = inp * (9 if image is not None else 1)
            shape = (out, inp, 3, 3) if image is not None else (out, inp)
            self.weights.append(torch.randn(shape, generator=generator) * math.sqrt(2 / fan_in))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.image is None:
            for w in self.weights:
                x = F.relu(x @ w.T)
            return x
        x = x.reshape(len(x), *self.image)
        for w in self.weights:
            x = F.avg_pool2d(F.relu(F.conv2d(x, w, padding=1)), 2)
        return x.flatten(1)


class CondensedSet:
    """`per_class` synthetic samples `[C, per_class, *shape]` per class, in the stream's units.

    window: recent arrivals kept per class (default 20 x per_class); every: arrivals of
    a class between updates (default `window`); steps: DM steps per update (0: k-means
    only); lr: step size as a share of the value range; iterations: k-means passes.
    """

    def __init__(
        self,
        num_classes: int,
        per_class: int,
        feature_shape: tuple[int, ...],
        dtype: str = "uint8",
        window: int | None = None,
        every: int | None = None,
        steps: int = 0,
        lr: float = 0.01,
        iterations: int = 10,
        seed: int = 0,
    ):
        if per_class < 1:
            raise ConfigError(f"condensed exemplars per class must be >= 1, got {per_class}")
        self.per_class = per_class
        self.window = window or 20 * per_class
        if self.window < per_class:
            raise ConfigError(f"condensed window {self.window} must be >= per_class {per_class}")
        self.every = every or self.window
        if self.every < 1 or steps < 0 or lr <= 0:
            raise ConfigError(
                f"condensed updates need every >= 1, steps >= 0 and lr > 0; got every "
                f"{self.every}, steps {steps}, lr {lr}"
            )
        self.steps = steps
        self.lr = lr
        self.iterations = iterations
        self.seed = seed
        self.shape = feature_shape
        self.image = image_shape(feature_shape)
        self.dtype = np.dtype(dtype)
        width = int(np.prod(feature_shape))
        self.exemplars = np.zeros((num_classes, per_class, width), dtype=np.float32)
        self.weight = np.zeros(num_classes)  # arrivals each class's exemplars stand for
        self.tasks = np.zeros(num_classes, dtype=np.int64)  # task of the class's last arrival
        self.recent = np.zeros((num_classes, self.window, width), dtype=np.float32)
        self.seen = np.zeros(num_classes, dtype=np.int64)  # arrivals per class, ever
        self.since = np.zeros(num_classes, dtype=np.int64)  # arrivals since the last update
        self.low, self.high = math.inf, -math.inf  # observed value range of the stream
        self.updates = 0

    def __len__(self) -> int:
        return int((self.weight > 0).sum()) * self.per_class

    @property
    def nbytes(self) -> int:
        return self.exemplars.nbytes + self.recent.nbytes + self.weight.nbytes

    def observe(self, features: np.ndarray, labels: np.ndarray, tasks: np.ndarray) -> None:
        """Keep arrivals `[B, *shape]` in their class's window; update classes that are due."""
        rows = features.reshape(len(features), -1).astype(np.float32)
        if len(rows):
            self.low = min(self.low, float(rows.min()))
            self.high = max(self.high, float(rows.max()))
        for row, label, task in zip(rows, labels.tolist(), tasks.tolist(), strict=True):
            self.recent[label, self.seen[label] % self.window] = row
            self.seen[label] += 1
            self.since[label] += 1
            self.tasks[label] = task
            if self.seen[label] >= self.window and self.since[label] >= self.every:
                self._update(label)

    def _update(self, label: int) -> None:
        self._kmeans(label)
        if self.steps:
            self._match(label)
        self.weight[label] += self.since[label]
        self.since[label] = 0
        self.updates += 1

    def _kmeans(self, label: int) -> None:
        points = self.recent[label]
        weights = np.ones(len(points), dtype=np.float32)
        init = None
        if self.weight[label] > 0:
            old = self.exemplars[label]
            share = min(self.weight[label], self.window) / self.per_class
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
        self.exemplars[label] = kmeans.centroids

    def _match(self, label: int) -> None:
        """`steps` DM steps on the class's synthetic samples against its window."""
        span = max(self.high - self.low, 1e-12)
        real = (torch.from_numpy(self.recent[label]) - self.low) / span  # [window, D] in [0, 1]
        synthetic = (torch.from_numpy(self.exemplars[label]) - self.low) / span
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.updates)
        for _ in range(self.steps):
            net = RandomEmbedding(real.shape[1], self.image, generator)
            rows = torch.randperm(len(real), generator=generator)[:REAL_BATCH]
            with torch.no_grad():
                target = net(real[rows]).mean(0)
            synthetic.requires_grad_(True)
            loss = (target - net(synthetic).mean(0)).pow(2).sum()
            (grad,) = torch.autograd.grad(loss, synthetic)
            with torch.no_grad():
                rms = grad.pow(2).mean().sqrt()
                if rms > 0:
                    synthetic = (synthetic - self.lr * grad / rms).clamp(0, 1)
            synthetic = synthetic.detach()
        self.exemplars[label] = (synthetic * span + self.low).numpy()

    def items(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features `[M, *shape]` (stream dtype), labels and tasks `[M]` of condensed classes."""
        classes = np.flatnonzero(self.weight > 0)
        flat = self.exemplars[classes].reshape(-1, self.exemplars.shape[2])
        if self.dtype.kind in "ui":
            info = np.iinfo(self.dtype)
            flat = np.clip(np.rint(flat), info.min, info.max)
        features = flat.astype(self.dtype).reshape(-1, *self.shape)
        labels = np.repeat(classes, self.per_class).astype(np.int64)
        return features, labels, np.repeat(self.tasks[classes], self.per_class)

    def state_dict(self) -> dict[str, Any]:
        return {
            "exemplars": torch.from_numpy(self.exemplars.copy()),
            "weight": torch.from_numpy(self.weight.copy()),
            "tasks": torch.from_numpy(self.tasks.copy()),
            "recent": torch.from_numpy(self.recent.copy()),
            "seen": torch.from_numpy(self.seen.copy()),
            "since": torch.from_numpy(self.since.copy()),
            "range": torch.tensor([self.low, self.high], dtype=torch.float64),
            "updates": self.updates,
            "shape": list(self.shape),  # for readers without the stream spec (streamcl report)
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "exemplars" not in state:
            raise ConfigError(
                "checkpoint's condensed exemplars predate their per-class windows (it holds "
                f"{sorted(state)}): it cannot be resumed; start from a fresh checkpoint"
            )
        self.exemplars = state["exemplars"].numpy().copy()
        self.weight = state["weight"].numpy().copy()
        self.tasks = state["tasks"].numpy().copy()
        self.recent = state["recent"].numpy().copy()
        self.seen = state["seen"].numpy().copy()
        self.since = state["since"].numpy().copy()
        self.low, self.high = (float(v) for v in state["range"].tolist())
        self.updates = int(state["updates"])
