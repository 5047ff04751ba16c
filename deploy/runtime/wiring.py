"""Assemble the learner (model, optimizer, strategies) from a `LearnerConfig`.

Strategies, noise filters, memory selectors and retrieval policies are looked up by name
in the registries of the layers that define them (learner/registry.py, memory/selectors.py,
memory/retrieval.py); a `package.module:function` name is imported here, at start-up.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from pydantic import BaseModel
from torch import nn

from streamcl.deploy.runtime.config import LearnerConfig
from streamcl.ingest.errors import ConfigError
from streamcl.ingest.schema import StreamSpec
from streamcl.learner.drift import BoundaryDetector
from streamcl.learner.ewc import OnlineEWC
from streamcl.learner.features import penultimate_embedding
from streamcl.learner.filters import NoiseFilter, input_embedding
from streamcl.learner.interference import virtual_update
from streamcl.learner.loop import OnlineLearner
from streamcl.learner.losses import TrainingLoss
from streamcl.learner.models import build_model
from streamcl.learner.quarantine import Quarantine
from streamcl.learner.registry import FILTERS, STRATEGIES, FilterContext, StrategyContext
from streamcl.learner.stepping import is_plain_sgd
from streamcl.learner.strategies import Strategy, replay_buffer
from streamcl.memory.buffer import Embed, ReplayBuffer
from streamcl.memory.index import gpu_available, set_threads
from streamcl.memory.retrieval import RETRIEVALS

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without it is a start-up error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


def configure_threads(threads: int) -> int:
    """Set torch's and FAISS's intra-op threads; returns the count in use.

    Tiny online models spend more time synchronising threads than computing, so
    `LearnerConfig.threads` defaults to 1 (see benchmarks/results/throughput.json).
    """
    torch.set_num_threads(threads)
    set_threads(threads)
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
    strategies = build_strategies(config, spec, device, model)
    if is_plain_sgd(optimizer):
        _ewc_steps_with_sgd(config, strategies, optimizer)
    memory = replay_buffer(strategies)
    learner = OnlineLearner(
        model,
        optimizer,
        strategies,
        spec,
        device,
        steps_per_batch=config.steps_per_batch,
        detector=build_detector(config, spec),
        consolidate_every=config.ewc.consolidate_every if "ewc" in config.parts else None,
        use_task_ids=config.use_task_ids,
        task_window=config.task_window,
        loss=build_loss(config, spec),
        noise_filter=build_noise_filter(config, spec, memory),
        quarantine=Quarantine(
            config.quarantine.capacity,
            config.quarantine.recheck_after,
            config.quarantine.max_checks,
        ),
        head=config.predict_head,
        memory=memory,
        memory_agreement=config.noise.memory_agreement,
    )
    log.info("learner built strategy=%s model=%s device=%s", config.strategy, config.model, device)
    return learner


def _ewc_steps_with_sgd(
    config: LearnerConfig, strategies: list[Strategy], optimizer: torch.optim.Optimizer
) -> None:
    """Under plain SGD and only built-in parts that leave the weights alone before the
    step (ER), EWC takes its penalty as one fused step on the weights (learner/ewc.py)."""
    if not set(config.parts) <= {"er", "ewc"}:
        return
    for strategy in strategies:
        if isinstance(strategy, OnlineEWC):
            strategy.step_with(lambda: optimizer.param_groups[0]["lr"])


def build_strategies(
    config: LearnerConfig,
    spec: StreamSpec,
    device: torch.device | None = None,
    model: nn.Module | None = None,
) -> list[Strategy]:
    """One strategy per part of `config.strategy`, in composition order (er, ewc, packnet,
    then plug-ins), each made by its factory in `STRATEGIES` with its config section.
    `model`: what a penultimate-feature memory embeds with and interfered retrieval scores
    with (needed only for those)."""
    interference = None
    if config.memory_retrieval == "interfered":
        if model is None:
            raise ValueError("interfered retrieval needs the model for its virtual update")
        interference = virtual_update(model, config.lr, spec.dtype, on(device))
    context = StrategyContext(
        spec,
        on(device),
        seed=config.seed,
        replay_size=config.replay_draws,
        memory=lambda: build_memory(config, spec, device, model),
        interference=interference,
    )
    strategies: list[Strategy] = []
    for part in config.parts:
        section = getattr(config, part, None) if part in STRATEGIES.names() else None
        settings = section.model_dump() if isinstance(section, BaseModel) else {}
        strategies.append(STRATEGIES.create(part, replace(context, settings=settings)))
    return strategies


def build_memory(
    config: LearnerConfig,
    spec: StreamSpec,
    device: torch.device | None = None,
    model: nn.Module | None = None,
) -> ReplayBuffer:
    """A replay memory as `config` describes it.

    It gets a FAISS index when something uses it (the kNN filter, a retrieval policy
    that needs it, dedup, a memory head), over `model`'s penultimate features or pooled
    inputs (`memory_embedding`); on the GPU when the model is and faiss can.
    """
    indexed = config.memory_indexed or RETRIEVALS.create(config.memory_retrieval).needs_index
    penultimate = config.memory_embedding_space == "penultimate"
    return ReplayBuffer(
        config.memory,
        spec.feature_shape,
        spec.dtype,
        policy=config.memory_policy,
        num_classes=spec.num_classes,
        seed=config.seed + 1,
        embed=memory_embedding(config, spec, device, model) if indexed else None,
        refresh=config.memory_refresh if penultimate else None,
        retrieval=config.memory_retrieval,
        dedup=config.memory_dedup,
        condensed=config.memory_condensed,
        condensed_steps=config.memory_condensed_steps,
        condensed_every=config.memory_condensed_every,
        index_device=(
            "cuda" if device is not None and device.type == "cuda" and gpu_available() else "cpu"
        ),
    )


def memory_embedding(
    config: LearnerConfig,
    spec: StreamSpec,
    device: torch.device | None,
    model: nn.Module | None,
) -> Embed:
    """The memory's `embed` callable: penultimate features of `model`, or pooled inputs."""
    if config.memory_embedding_space == "input":
        return input_embedding(spec.dtype)
    if model is None:
        raise ValueError("a penultimate-feature memory embedding needs the model")
    return penultimate_embedding(model, spec.dtype, on(device))


def on(device: torch.device | None) -> torch.device:
    return device if device is not None else torch.device("cpu")


def build_detector(config: LearnerConfig, spec: StreamSpec) -> BoundaryDetector | None:
    """The boundary detector `config.detector` describes, or None for kind none."""
    settings = config.detector
    if settings.kind == "none":
        return None
    return BoundaryDetector(
        spec.num_classes,
        kind=settings.kind,
        signal=settings.signal,
        new_classes=settings.new_classes,
        min_gap=settings.min_gap,
        threshold=settings.threshold,
        delta=settings.delta,
        min_instances=settings.min_instances,
        alpha=settings.alpha,
        confidence=settings.confidence,
    )


def build_loss(config: LearnerConfig, spec: StreamSpec) -> TrainingLoss:
    settings = config.loss
    return TrainingLoss(
        spec.num_classes,
        robust=settings.robust,
        gce_q=settings.gce_q,
        sce_alpha=settings.sce_alpha,
        sce_beta=settings.sce_beta,
        ace=settings.ace,
        ace_recent_share=settings.ace_recent_share,
        logit_adjust_tau=settings.logit_adjust_tau,
        reweight=settings.reweight,
        reweight_beta=settings.reweight_beta,
    )


def build_noise_filter(
    config: LearnerConfig, spec: StreamSpec, memory: ReplayBuffer | None
) -> NoiseFilter | None:
    """The enabled filters (knn, small-loss, then `noise.extra`); neighbour search covers
    the replay memory when there is one."""
    settings = config.noise
    switches = (("knn", config.knn_filter), ("small-loss", settings.small_loss))
    enabled = [name for name, on in switches if on] + list(settings.extra_filters)
    if not enabled:
        return None
    # The kNN filter compares pooled inputs: it may search the memory's index only when
    # that holds pooled inputs too; over penultimate features it keeps to its window.
    shared = memory if config.memory_embedding_space == "input" else None
    if memory is not None and shared is None and config.knn_filter:
        log.info("knn noise filter searches its window only: the memory indexes features")
    context = FilterContext(spec, settings.model_dump(), shared)
    return NoiseFilter([FILTERS.create(name, context) for name in enabled])
