"""The online learner: one update per incoming batch, test-then-train predictions for free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ingest.errors import ConfigError
from ingest.schema import Batch, StreamSpec
from learner.strategies import Strategy, UpdateBatch


@dataclass(frozen=True)
class LearnResult:
    """predictions: `[B]` labels the model gave the batch *before* learning it (prequential)."""

    predictions: np.ndarray
    loss: float


class InputAdapter:
    """Move stream features to the device and scale them: uint8 -> [0, 1] float32.

    uint8 crosses the host-device link as bytes (4x less than float32) and is
    converted on the device.
    """

    def __init__(self, spec: StreamSpec, device: torch.device):
        self.device = device
        self._scale = 1.0 / 255.0 if spec.dtype == "uint8" else None
        self._pin = device.type == "cuda"

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        if self._pin:
            features = features.pin_memory()
        x = features.to(self.device, non_blocking=True).float()
        return x.mul_(self._scale) if self._scale is not None else x


class OnlineLearner:
    """Learn from batches as they arrive; `learn` / `predict` are the verb pair."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        strategies: list[Strategy],
        spec: StreamSpec,
        device: torch.device,
        steps_per_batch: int = 1,
    ):
        if steps_per_batch < 1:
            raise ConfigError(f"steps_per_batch must be >= 1, got {steps_per_batch}")
        self.model = model.to(device)
        self.optimizer = optimizer
        self.strategies = strategies
        self.spec = spec
        self.device = device
        self.steps_per_batch = steps_per_batch
        self.to_inputs = InputAdapter(spec, device)
        self.updates = 0

    def learn(self, batch: Batch) -> LearnResult:
        """Run `steps_per_batch` updates on the batch (plus whatever strategies add)."""
        if not self.model.training:
            self.model.train()
        fresh = UpdateBatch(
            features=torch.from_numpy(batch.features),
            labels=torch.from_numpy(batch.labels),
            tasks=torch.from_numpy(batch.tasks),
            num_new=len(batch),
        )
        predictions = torch.empty(0, dtype=torch.int64)
        for step in range(self.steps_per_batch):
            update = fresh
            for strategy in self.strategies:
                update = strategy.prepare(update)
            logits = self.model(self.to_inputs(update.features))
            if step == 0:
                # The first forward pass precedes any update on this batch: test-then-train.
                predictions = logits[: update.num_new].detach().argmax(dim=1)
            labels = update.labels.to(self.device, non_blocking=True)
            loss = nn.functional.cross_entropy(logits, labels)
            for strategy in self.strategies:
                extra = strategy.penalty(self.model)
                if extra is not None:
                    loss = loss + extra
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.updates += 1
        for strategy in self.strategies:
            strategy.after_update(batch)
        return LearnResult(predictions.cpu().numpy(), float(loss.detach()))

    def predict(self, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Labels `[N]` for features `[N, *shape]` in the stream dtype."""
        return self._logits(features, batch_size).argmax(dim=1).numpy()

    def predict_proba(self, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Class probabilities `[N, C]`."""
        return torch.softmax(self._logits(features, batch_size), dim=1).numpy()

    @torch.no_grad()
    def _logits(self, features: np.ndarray, batch_size: int) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        out = [torch.empty(0, self.spec.num_classes)]
        for start in range(0, len(features), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(features[start : start + batch_size]))
            out.append(self.model(self.to_inputs(chunk)).float().cpu())
        self.model.train(was_training)
        return torch.cat(out)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "strategies": [s.state_dict() for s in self.strategies],
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for strategy, sub in zip(self.strategies, state["strategies"], strict=True):
            strategy.load_state_dict(sub)
        self.updates = int(state["updates"])
