"""Embed the learner in your own program instead of running `streamcl serve` or `replay`.

Build a `Learner` from the same `LearnerConfig` the commands read (every setting, its
default and range is there) and the stream's `StreamSpec`, then call the verbs:

- `learn(batch)`: one online update on a `Batch` (`Batch.from_arrays(features, labels)`);
  returns what the model predicted for it *before* learning it (test-then-train), and
  which rows the noise filters held back;
- `predict(features)` / `predict_proba(features)`: labels `[N]` / probabilities `[N, C]`;
- `state_dict()` / `load_state_dict(state)`: everything learned (model, optimizer, replay
  memory, filters, generators) as tensors and plain containers, for `torch.save` and
  `torch.load(weights_only=True)`; loading checks that the settings match.

Batching, evaluation against held-out data and checkpoint files are the caller's; the
commands add exactly those around the same learner. Construction seeds torch's global
generator (`config.seed`), and `config.threads`, when set, sets torch's thread count for
the whole process.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamcl.deploy.runtime.config import LearnerConfig
from streamcl.deploy.runtime.wiring import build_learner, configure_threads
from streamcl.ingest.errors import ConfigError, DataError
from streamcl.ingest.schema import Batch, StreamSpec
from streamcl.learner.loop import LearnResult

__all__ = ["Batch", "LearnResult", "Learner", "LearnerConfig", "StreamSpec"]


class Learner:
    """An online continual learner: `learn` a batch at a time, `predict` at any time."""

    def __init__(self, config: LearnerConfig, spec: StreamSpec):
        configure_threads(config.threads)  # None leaves torch's setting alone
        self.config = config
        self.spec = spec
        self._online = build_learner(config, spec)

    def learn(self, batch: Batch) -> LearnResult:
        """Update the model on `batch` (`steps_per_batch` steps, plus replay draws)."""
        self._check(batch.features)
        labels, classes = batch.labels, self.spec.num_classes
        if len(labels) and (labels.min() < 0 or labels.max() >= classes):
            raise DataError(f"labels must be in [0, {classes}), got {labels.min()}..{labels.max()}")
        return self._online.learn(batch)

    def predict(self, features: np.ndarray, tasks: np.ndarray | None = None) -> np.ndarray:
        """Labels `[N]` for features `[N, *shape]`; tasks `[N]` for task-aware strategies
        (PackNet), else the task being learned now."""
        self._check(features)
        return self._online.predict(features, tasks)

    def predict_proba(self, features: np.ndarray, tasks: np.ndarray | None = None) -> np.ndarray:
        """Class probabilities `[N, C]` for features `[N, *shape]`."""
        self._check(features)
        return self._online.predict_proba(features, tasks)

    def state_dict(self) -> dict[str, Any]:
        """The settings and everything learned; tensors and plain containers only."""
        return {
            "config": self.config.model_dump(mode="json"),
            "spec": self.spec.to_dict(),
            "learner": self._online.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()` of a learner with the same settings and spec."""
        config = self.config.model_dump(mode="json")
        changed = sorted(k for k in config if state["config"].get(k) != config[k])
        if changed or state["spec"] != self.spec.to_dict():
            what = ", ".join(changed or ["spec"])
            raise ConfigError(f"the state was saved by a learner with other settings: {what}")
        self._online.load_state_dict(state["learner"])

    def _check(self, features: np.ndarray) -> None:
        shape, dtype = tuple(features.shape[1:]), str(features.dtype)
        if shape != self.spec.feature_shape or dtype != self.spec.dtype:
            raise DataError(
                f"features must be [N, {', '.join(map(str, self.spec.feature_shape))}] "
                f"{self.spec.dtype}, got [{', '.join(map(str, features.shape))}] {dtype}"
            )
        if dtype == "float32" and not np.isfinite(features).all():
            raise DataError("features must be finite, got NaN or infinity")
