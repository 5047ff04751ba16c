"""A held-out probe diverted from the stream itself, for services without a test set."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class ProbeReservoir:
    """Divert a `fraction` of arriving samples, per class, into a fixed-size probe.

    A diverted sample is never trained on. Each class keeps at most `per_class`
    samples; once full, diverted newcomers replace a uniformly random old one
    (reservoir sampling over that class's diverted samples), so the probe follows
    the stream while the held-out share stays `fraction`.
    """

    def __init__(
        self,
        fraction: float,
        per_class: int,
        num_classes: int,
        feature_shape: tuple[int, ...],
        dtype: str,
        seed: int = 0,
    ):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"probe fraction must be in (0, 1), got {fraction}")
        if per_class < 1:
            raise ValueError(f"probe per_class must be >= 1, got {per_class}")
        self.fraction = fraction
        self.per_class = per_class
        self.features = np.zeros((num_classes, per_class, *feature_shape), dtype=dtype)
        self.counts = np.zeros(num_classes, dtype=np.int64)
        self.diverted = np.zeros(num_classes, dtype=np.int64)
        self._gen = torch.Generator().manual_seed(seed)

    def offer(self, features: np.ndarray, label: int) -> bool:
        """True when the sample was diverted into the probe (the caller must not learn it)."""
        u_divert, u_slot = torch.rand(2, generator=self._gen, dtype=torch.float64).tolist()
        if u_divert >= self.fraction:
            return False
        self.diverted[label] += 1
        if self.counts[label] < self.per_class:
            self.features[label, self.counts[label]] = features
            self.counts[label] += 1
        else:
            slot = int(u_slot * self.diverted[label])
            if slot < self.per_class:
                self.features[label, slot] = features
        return True

    def __len__(self) -> int:
        return int(self.counts.sum())

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The probe now: features `[M, *shape]`, labels `[M]`."""
        labels = np.repeat(np.arange(len(self.counts)), self.counts)
        mask = np.arange(self.per_class)[None, :] < self.counts[:, None]
        return self.features[mask], labels

    def state_dict(self) -> dict[str, Any]:
        return {
            "features": torch.from_numpy(self.features.copy()),
            "counts": torch.from_numpy(self.counts.copy()),
            "diverted": torch.from_numpy(self.diverted.copy()),
            "generator": self._gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.features[...] = state["features"].numpy()
        self.counts[...] = state["counts"].numpy()
        self.diverted[...] = state["diverted"].numpy()
        self._gen.set_state(state["generator"])
