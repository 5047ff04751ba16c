"""Fixed-capacity storage of exemplars in their stream dtype (uint8 images stay 1 byte)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class ExemplarStore:
    """Rows `[capacity, *feature_shape]` of features plus labels and task ids.

    Arrays live in numpy so single-row writes are cheap; reads gather through
    tensor views of the same memory.
    """

    def __init__(self, capacity: int, feature_shape: tuple[int, ...], dtype: np.dtype | str):
        self.capacity = capacity
        self.features = np.zeros((capacity, *feature_shape), dtype=dtype)
        self.labels = np.zeros(capacity, dtype=np.int64)
        self.tasks = np.zeros(capacity, dtype=np.int64)
        self.size = 0
        # Tensor views sharing the arrays' memory, made once: reads gather from them.
        self._views = tuple(torch.from_numpy(a) for a in (self.features, self.labels, self.tasks))

    def write(
        self, slots: np.ndarray, features: np.ndarray, labels: np.ndarray, tasks: np.ndarray
    ) -> None:
        """Overwrite distinct `slots` `[n]` with rows; the store grows to cover them."""
        self.features[slots] = features
        self.labels[slots] = labels
        self.tasks[slots] = tasks
        self.size = max(self.size, int(slots.max()) + 1)

    def read(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gather rows; slots `[n]` int64 -> features `[n, *shape]`, labels `[n]`, tasks `[n]`."""
        features, labels, tasks = self._views
        # index_select copies whole rows; advanced indexing goes element by element
        # (and costs more per call even for the one-number rows).
        return (
            features.index_select(0, slots),
            labels.index_select(0, slots),
            tasks.index_select(0, slots),
        )

    @property
    def nbytes(self) -> int:
        return self.features.nbytes + self.labels.nbytes + self.tasks.nbytes

    def state_dict(self) -> dict[str, Any]:
        n = self.size
        return {
            "size": n,
            "features": torch.from_numpy(self.features[:n].copy()),
            "labels": torch.from_numpy(self.labels[:n].copy()),
            "tasks": torch.from_numpy(self.tasks[:n].copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = int(state["size"])
        if n > self.capacity:
            raise ValueError(f"stored {n} exemplars exceed capacity {self.capacity}")
        self.features[:n] = state["features"].numpy()
        self.labels[:n] = state["labels"].numpy()
        self.tasks[:n] = state["tasks"].numpy()
        self.size = n
