"""Assemble the learner (model, optimizer, strategies) from a `LearnerConfig`."""

from __future__ import annotations

import logging

import torch

from deploy.config import LearnerConfig
from ingest.errors import ConfigError
from ingest.schema import StreamSpec
from learner.loop import OnlineLearner
from learner.models import build_model
from learner.strategies import ExperienceReplay, Naive, Strategy
from memory.buffer import ReplayBuffer

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without it is a start-up error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None keeps torch's default); returns the count in use.

    Tiny online models spend more time synchronising threads than computing, so
    callers default to 1 on CPU (see benchmarks/results/throughput.json).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def build_learner(config: LearnerConfig, spec: StreamSpec) -> OnlineLearner:
    """Seeded construction: the same config and spec give the same initial learner."""
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = build_model(config.model, spec.feature_shape, spec.num_classes, config.hidden)
    model = model.to(device)
    optimizer: torch.optim.Optimizer
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    strategies = build_strategies(config, spec)
    learner = OnlineLearner(
        model, optimizer, strategies, spec, device, steps_per_batch=config.steps_per_batch
    )
    log.info("learner built strategy=%s model=%s device=%s", config.strategy, config.model, device)
    return learner


def build_strategies(config: LearnerConfig, spec: StreamSpec) -> list[Strategy]:
    if config.strategy == "naive":
        return [Naive()]
    buffer = ReplayBuffer(
        config.memory,
        spec.feature_shape,
        spec.dtype,
        policy=config.memory_policy,
        num_classes=spec.num_classes,
        seed=config.seed + 1,
    )
    return [ExperienceReplay(buffer, config.replay_draws, seed=config.seed + 2)]
