"""Label-noise filters: small-loss selection and neighbour label agreement, composable.

Each filter looks at the arriving rows before the model learns them and says, per row,
`PASS`, `FLAG` (suspect) or `ABSTAIN` (no basis to judge yet); a `NoiseFilter` runs the
enabled ones and a row is suspect when any filter flags it, with that filter's name as
the reason. The learner never sees ground-truth noise flags.

Why these designs (measured on Split Fashion-MNIST, /work/shared/FINDINGS.md):
- Small loss keeps one *global* loss model, not one per class: early in a task a label
  that names a class the model has not learned has no clean reference of its own, and
  per-class thresholds then judge it against noise only. Labels with too few admitted
  samples make the filter abstain instead, and the neighbour filter covers them.
  The threshold is adaptive: a two-component Gaussian mixture over recent log-losses
  (the high-loss component is the noise), trusted only when the two components are
  well separated (Ashman's D), so a clean stream, whose losses are not bimodal, is not
  filtered at all.
- Neighbour agreement searches the memory *plus a window of recent arrivals*: the
  memory alone holds no sample of a brand-new class, so every clean sample of it would
  disagree. A row is suspect when its label is not the most frequent among its
  neighbours' labels, which holds for symmetric, pair-flip and class-dependent noise as
  long as the true label stays the plurality.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from streamcl.ingest.errors import ConfigError
from streamcl.memory.buffer import Embed, ReplayBuffer
from streamcl.memory.index import EmbeddingIndex

PASS, FLAG, ABSTAIN = 0, 1, -1
REFILL_PER_NEIGHBOUR = 10
"""The kNN filter judges again once its emptied window holds this many arrivals per
neighbour asked for (10 per class on average at k = 10 over 10 classes)."""
CONFIRM_SHARE = 0.7
"""A label carried by this share of a row's neighbours (and their plurality) is confirmed:
the replay memory's agreement gate takes the row even when the model does not predict it
yet (a new class or domain). At any plurality, noise leaked in (imbalance 10 with 40 %
noise: 0.735 against 0.773 at 0.7, 3 seeds)."""
NeighbourLabels = Callable[[torch.Tensor, int], torch.Tensor]
"""`(queries [B, D], k) -> labels [B, k]` of each query's k nearest stored items (-1 pads
when fewer are stored). `IndexNeighbours` serves it from FAISS indexes."""


class Filter(Protocol):
    name: str

    def judge(
        self, losses: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> np.ndarray:
        """`[B]` of PASS / FLAG / ABSTAIN for rows with losses, embeddings `[B, D]`, labels."""
        ...

    def observe(
        self,
        losses: torch.Tensor,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        admitted: np.ndarray,
    ) -> None:
        """Learn from the arrivals just judged (all of them; `admitted` `[B]` bool)."""
        ...

    def restart(self) -> None:
        """The stream shifted (a task boundary or a detected drift): forget what was normal."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


EMBED_DIM = 196
"""Inputs longer than this are average-pooled down to it for neighbour search (a 28x28
image to 196 values): kNN over the pooled vector is as telling and 4x cheaper."""


def embed_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """`[B, *shape]` scaled inputs -> `[B, D]` unit vectors (cosine similarity by dot product).

    Raw inputs, not the model's features: stored embeddings then never go stale.
    """
    flat = inputs.detach().flatten(1).float()
    if flat.shape[1] > EMBED_DIM:
        flat = nn.functional.adaptive_avg_pool1d(flat.unsqueeze(1), EMBED_DIM).squeeze(1)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


def input_embedding(dtype: str) -> Embed:
    """The memory's `embed` callable: stream-dtype features -> `embed_inputs` rows, scaled
    as the loop scales inputs (uint8 / 255), so memory and arrivals share one space."""
    scale = 1.0 / 255.0 if dtype == "uint8" else 1.0

    def embed(features: np.ndarray) -> np.ndarray:
        inputs = torch.from_numpy(np.ascontiguousarray(features)).float() * scale
        return embed_inputs(inputs).numpy()

    return embed


def embedding_dim(feature_size: int) -> int:
    return min(feature_size, EMBED_DIM)


class RecentWindow:
    """The last `size` arrivals' embeddings `[size, D]` and labels, whatever their verdict.

    Ring positions are the slots of a FAISS index (memory/index.py), rebuilt on load.
    """

    def __init__(self, size: int, dim: int):
        if size < 1:
            raise ConfigError(f"neighbour window must be >= 1 sample, got {size}")
        self.labels = torch.full((size,), -1, dtype=torch.int64)
        self.index = EmbeddingIndex(size, dim)
        self.next = 0
        self.count = 0

    @property
    def embeddings(self) -> torch.Tensor:
        """`[size, D]` view of the indexed rows (zeros where nothing arrived yet)."""
        return torch.from_numpy(self.index.embeddings)

    def add(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        # Only the last `size` rows of a batch larger than the window survive anyway.
        embeddings, labels = embeddings[-len(self.labels) :], labels[-len(self.labels) :]
        rows = (self.next + torch.arange(len(labels))) % len(self.labels)
        self.index.write(rows.numpy(), embeddings.detach().cpu().float().numpy())
        self.labels[rows] = labels.cpu()
        self.next = int((self.next + len(labels)) % len(self.labels))
        self.count = min(self.count + len(labels), len(self.labels))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Similarities and labels `[B, k]` of the nearest arrivals (-inf / -1 pad)."""
        scores, slots = self.index.search(queries, k)
        missing = slots < 0
        labels = np.where(missing, -1, self.labels.numpy()[slots.clip(0)])
        return np.where(missing, -np.inf, scores).astype(np.float32), labels

    def clear(self) -> None:
        self.labels.fill_(-1)
        self.index.clear()
        self.next = self.count = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "embeddings": self.embeddings.clone(),
            "labels": self.labels.clone(),
            "next": self.next,
            "count": self.count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.labels = state["labels"].clone()
        self.next, self.count = int(state["next"]), int(state["count"])
        self.index.clear()
        # Filled slots: the first `count` until the ring wraps, then all of them.
        filled = np.arange(self.count)
        self.index.write(filled, state["embeddings"].numpy()[filled])


class IndexNeighbours:
    """Exact cosine kNN (FAISS flat indexes) over the recent window plus, when given, the
    replay memory's index; one merged top-k by similarity."""

    def __init__(self, window: RecentWindow, memory: ReplayBuffer | None = None):
        self.window = window
        self.memory = memory if memory is not None and memory.index is not None else None

    def __call__(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        rows = queries.detach().cpu().float().numpy()
        scores, labels = self.window.search(rows, k)
        if self.memory is not None:
            more_scores, more_labels = self.memory.search(rows, k)
            scores = np.concatenate([scores, more_scores], axis=1)
            labels = np.concatenate([labels, more_labels], axis=1)
        # Stable: on equal similarity the window (recent) comes first.
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return torch.from_numpy(np.take_along_axis(labels, order, axis=1).astype(np.int64))


class NeighbourAgreement:
    """Flag a row whose label is not the plurality among its `k` nearest neighbours' labels,
    is carried by fewer than `min_agreement` of them, and whose neighbours' plurality label
    holds at least `min_plurality` of them.

    The share floor spares clean samples of look-alike classes (shirt and T-shirt are
    each other's neighbours) while a noisy label, which its neighbours almost never
    carry, is still flagged; 1 keeps the bare plurality rule (catches pair-flip noise
    too, at more false alarms). The plurality floor makes an uninformative neighbourhood
    judge nothing: on a new domain (a permuted task) the model's embeddings do not yet
    separate the classes, neighbours' labels are near uniform, and without the floor
    three clean samples in four were held back, so the model never learned the task and
    the filter never recovered (naive on a clean permuted stream fell from 0.57 to 0.10).
    Abstains until the window holds `REFILL_PER_NEIGHBOUR * k` arrivals (or is full), at
    the start and again after each shift (task boundary or detected drift), when `restart`
    empties it: on a permuted stream the
    arrivals of the last domain outvoted clean labels of the new one (EWC with ADWIN,
    5 x 10,000: 0.73 without the filter, 0.55 with a window kept across shifts).
    `neighbours` defaults to the FAISS search over the recent window (and the memory,
    when the learner wires it in).
    """

    name = "knn"
    needs_embeddings = True

    def __init__(
        self,
        dim: int,
        k: int = 10,
        window: int = 1000,
        neighbours: NeighbourLabels | None = None,
        min_agreement: float = 1.0,
        min_plurality: float = 0.0,
    ):
        if k < 1:
            raise ConfigError(f"knn k must be >= 1, got {k}")
        if not 0.0 <= min_agreement <= 1.0:
            raise ConfigError(f"knn min_agreement must be in [0, 1], got {min_agreement}")
        if not 0.0 <= min_plurality <= 1.0:
            raise ConfigError(f"knn min_plurality must be in [0, 1], got {min_plurality}")
        self.k = k
        self.min_agreement = min_agreement
        self.min_plurality = min_plurality
        self.window = RecentWindow(window, dim)
        self.neighbours: NeighbourLabels = neighbours or IndexNeighbours(self.window)
        self.confirmed = np.zeros(0, dtype=bool)  # last judged rows: see CONFIRM_SHARE

    def judge(
        self, losses: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> np.ndarray:
        votes = self._votes(embeddings, labels)
        if votes is None:
            self.confirmed = np.zeros(len(labels), dtype=bool)
            return np.full(len(labels), ABSTAIN)
        own, plurality = votes
        self.confirmed = self._confirms(own, plurality)
        outvoted = (
            (own < plurality)
            & (own < self.min_agreement * self.k)
            & (plurality >= self.min_plurality * self.k)
        )
        return np.where(outvoted.numpy(), FLAG, PASS)

    def vouch(self, embeddings: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        """Rows `[B]` whose label their neighbours confirm (`CONFIRM_SHARE`), judged now."""
        votes = self._votes(embeddings, labels)
        if votes is None:
            return np.zeros(len(labels), dtype=bool)
        return self._confirms(*votes)

    def _votes(
        self, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Neighbours carrying each row's own label `[B]`, and the plurality label's count
        `[B]`; None while the window refills."""
        if self.window.count < min(len(self.window.labels), REFILL_PER_NEIGHBOUR * self.k):
            return None
        found = self.neighbours(embeddings, self.k)
        valid = found >= 0
        counts = torch.zeros(len(labels), int(max(labels.max(), found.max())) + 1)
        counts.scatter_add_(1, found.clamp_min(0), valid.float())
        own = counts.gather(1, labels.cpu().unsqueeze(1)).squeeze(1)
        return own, counts.max(dim=1).values

    def _confirms(self, own: torch.Tensor, plurality: torch.Tensor) -> np.ndarray:
        return ((own == plurality) & (own >= CONFIRM_SHARE * self.k)).numpy()

    def observe(
        self,
        losses: torch.Tensor,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        admitted: np.ndarray,
    ) -> None:
        self.window.add(embeddings, labels)

    def restart(self) -> None:
        """Forget the window: after a shift its arrivals are from before it."""
        self.window.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.load_state_dict(state["window"])


class SmallLoss:
    """Flag rows in the high-loss component of a global two-component mixture of log-losses.

    Abstains for the first `warmup` arrivals (the model is still random), for labels with
    fewer than `min_class_samples` admitted arrivals (no clean reference yet), and while
    the mixture's components overlap (Ashman's D below `min_separation`: not bimodal).
    The mixture is refitted on the last `window` losses every `refit_every` arrivals.
    After a shift every arrival is high-loss for a while: the filter starts over (warmup,
    class counts, threshold), or it would hold back the whole new task as noise.
    """

    name = "small-loss"
    needs_embeddings = False

    def __init__(
        self,
        num_classes: int,
        warmup: int = 1000,
        window: int = 2000,
        refit_every: int = 500,
        min_class_samples: int = 100,
        min_separation: float = 2.0,
    ):
        if warmup < 0 or window < 10 or refit_every < 1 or min_class_samples < 0:
            raise ConfigError(
                "small-loss needs warmup >= 0, window >= 10, refit_every >= 1, "
                f"min_class_samples >= 0; got {warmup}, {window}, {refit_every}, "
                f"{min_class_samples}"
            )
        self.warmup = warmup
        self.min_class_samples = min_class_samples
        self.min_separation = min_separation
        self.refit_every = refit_every
        self.losses = np.zeros(window)
        self.count = 0
        self.admitted_per_class = np.zeros(num_classes, dtype=np.int64)
        self.threshold = math.inf  # log-loss above which a row is flagged
        self._since_fit = 0
        self._judged: tuple[torch.Tensor, np.ndarray] | None = None  # observe reuses it

    def _log_losses(self, losses: torch.Tensor) -> np.ndarray:
        """`[B]` float64 log-losses, computed once for the judge and observe of a batch."""
        if self._judged is not None and self._judged[0] is losses:
            return self._judged[1]
        values = np.log(losses.detach().cpu().double().numpy() + 1e-8)
        self._judged = (losses, values)
        return values

    def judge(
        self, losses: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> np.ndarray:
        values = self._log_losses(losses)
        verdict = np.where(values > self.threshold, FLAG, PASS)
        immature = self.admitted_per_class[labels.cpu().numpy()] < self.min_class_samples
        if self.count < self.warmup:
            immature[:] = True
        return np.where(immature, ABSTAIN, verdict)

    def observe(
        self,
        losses: torch.Tensor,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        admitted: np.ndarray,
    ) -> None:
        values = self._log_losses(losses)
        self._judged = None
        rows = (self.count + np.arange(len(values))) % len(self.losses)
        self.losses[rows] = values
        self.count += len(values)
        counts = self.admitted_per_class
        counts += np.bincount(labels.cpu().numpy()[admitted], minlength=len(counts))
        self._since_fit += len(values)
        if self._since_fit >= self.refit_every and self.count >= min(self.warmup, len(self.losses)):
            self._since_fit = 0
            self.threshold = mixture_threshold(
                self.losses[: min(self.count, len(self.losses))], self.min_separation
            )

    def restart(self) -> None:
        self.count = 0
        self.admitted_per_class[:] = 0
        self.threshold = math.inf
        self._since_fit = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "losses": torch.from_numpy(self.losses.copy()),
            "count": self.count,
            "admitted_per_class": torch.from_numpy(self.admitted_per_class.copy()),
            "threshold": self.threshold,
            "since_fit": self._since_fit,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = state["losses"].numpy().copy()
        self.count = int(state["count"])
        self.admitted_per_class = state["admitted_per_class"].numpy().copy()
        self.threshold = float(state["threshold"])
        self._since_fit = int(state["since_fit"])


def mixture_threshold(values: np.ndarray, min_separation: float, iterations: int = 15) -> float:
    """Fit a 1-D two-Gaussian mixture by EM; the value where the high component takes over.

    Returns inf (flag nothing) when the components are not separated by Ashman's
    D = sqrt(2) |mu1 - mu2| / sqrt(s1^2 + s2^2) >= `min_separation`.
    Components are rows of `[2, n]` arrays written in place and reduced by dot
    products: a refit of 2,000 losses takes well under a millisecond.
    """
    values = np.ascontiguousarray(values, dtype=np.float64)
    lo, hi = np.quantile(values, [0.25, 0.75])
    mu = np.array([lo, hi])
    var = np.full(2, values.var() / 4 + 1e-6)
    weight = np.array([0.5, 0.5])
    diff = np.empty((2, len(values)))
    dens = np.empty_like(diff)
    for _ in range(iterations):
        np.subtract(values, mu[:, None], out=diff)
        np.multiply(diff, diff, out=dens)
        dens *= (-0.5 / var)[:, None]
        np.exp(dens, out=dens)
        dens *= (weight / np.sqrt(var))[:, None]
        total_density = (dens[0] + dens[1]).clip(1e-300)
        dens /= total_density  # responsibilities
        total = dens.sum(axis=1).clip(1e-12)
        weight = total / len(values)
        mu = (dens @ values) / total
        np.subtract(values, mu[:, None], out=diff)
        var = np.einsum("kn,kn,kn->k", dens, diff, diff) / total + 1e-6
    low, high = int(np.argmin(mu)), int(np.argmax(mu))
    separation = math.sqrt(2) * abs(mu[high] - mu[low]) / math.sqrt(var[low] + var[high])
    if low == high or separation < min_separation:
        return math.inf
    grid = np.linspace(mu[low], mu[high], 200)
    at = weight[:, None] * np.exp(-((grid - mu[:, None]) ** 2) / (2 * var[:, None]))
    at /= np.sqrt(var)[:, None]
    above = np.flatnonzero(at[high] > at[low])
    return float(grid[above[0]]) if len(above) else math.inf


class NoiseFilter:
    """Run the enabled filters; a row is suspect when any of them flags it.

    A filter whose `needs_embeddings` is False (small loss) is handed `[B, 0]` embeddings;
    when none needs them the learner skips embedding the arrivals (`needs_embeddings`).
    A filter without the attribute gets them.
    """

    def __init__(self, filters: list[Filter]):
        names = [f.name for f in filters]
        if len(set(names)) != len(names):  # their states are saved by name
            raise ConfigError(f"noise filters need distinct names, got {', '.join(names)}")
        self.filters = filters
        self.needs_embeddings = any(getattr(f, "needs_embeddings", True) for f in filters)
        self.confirmed = np.zeros(0, dtype=bool)

    def judge(
        self, losses: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> list[str]:
        """Per row `[B]`: '' when admitted, else the name of the first filter that flagged it.

        Also sets `confirmed` `[B]`: rows whose label a filter positively vouches for (the
        kNN filter: `CONFIRM_SHARE` of the neighbours carry it); the replay memory's
        agreement gate lets those in even when the model does not predict them yet.
        """
        reasons = [""] * len(labels)
        self.confirmed = np.zeros(len(labels), dtype=bool)
        for f in self.filters:
            verdict = f.judge(losses, embeddings, labels)
            for i in np.flatnonzero(verdict == FLAG):
                if not reasons[i]:
                    reasons[i] = f.name
            vouched = getattr(f, "confirmed", None)
            if vouched is not None and len(vouched) == len(labels):
                self.confirmed |= vouched
        return reasons

    def vouch(self, inputs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        """Rows `[B]` of scaled `inputs` whose label a filter vouches for now (the kNN
        filter's neighbours); all False when none can."""
        vouched = np.zeros(len(labels), dtype=bool)
        judges = [f for f in self.filters if hasattr(f, "vouch")]
        if judges:
            embeddings = embed_inputs(inputs)
            for f in judges:
                vouched |= f.vouch(embeddings, labels)
        return vouched

    def observe(
        self,
        losses: torch.Tensor,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        admitted: np.ndarray,
    ) -> None:
        for f in self.filters:
            f.observe(losses, embeddings, labels, admitted)

    def restart(self) -> None:
        for f in self.filters:
            f.restart()

    def state_dict(self) -> dict[str, Any]:
        return {f.name: f.state_dict() for f in self.filters}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in self.filters:
            f.load_state_dict(state[f.name])
