"""The learner's pluggable parts: strategies and label-noise filters, by name.

A strategy factory takes one `StrategyContext` and returns an object with the hooks of
`learner.strategies.Strategy` (subclass `NoHooks` and define the ones you need, plus
`state_dict` / `load_state_dict`); the loop calls them in the order documented there.
Register it (`STRATEGIES.register("mine", make)`) or name it by path: `--strategy
mypkg.parts:make`, alone or joined to built-ins (`er+mypkg.parts:make`).

A filter factory takes one `FilterContext` and returns a `learner.filters.Filter`
(`name`, `judge`, `observe`, `restart`, `state_dict`, `load_state_dict`), named in the
noise settings' `extra` (`--noise extra=mypkg.parts:make`); the enabled filters run in
`NoiseFilter`, a row being suspect when any of them flags it.

Factories take a context object rather than keyword arguments so that a field added
later does not break anyone's factory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from streamcl.ingest.registry import Registry
from streamcl.ingest.schema import StreamSpec
from streamcl.learner.ewc import OnlineEWC
from streamcl.learner.filters import (
    Filter,
    IndexNeighbours,
    NeighbourAgreement,
    SmallLoss,
    embedding_dim,
)
from streamcl.learner.packnet import PackNet
from streamcl.learner.strategies import ExperienceReplay, Naive, Strategy
from streamcl.memory.buffer import ReplayBuffer
from streamcl.memory.retrieval import Interference


@dataclass(frozen=True)
class StrategyContext:
    """What a strategy factory builds from.

    seed: the learner's seed (each built-in offsets it, so parts draw independently);
    replay_size: replay draws per step; memory: builds a new replay memory as configured
    (capacity, selector, retrieval, index); settings: the strategy's own config section by
    field name (`ewc`, `packnet`), empty for parts that have none.
    """

    spec: StreamSpec
    device: torch.device
    seed: int
    replay_size: int
    memory: Callable[[], ReplayBuffer]
    settings: Mapping[str, Any] = field(default_factory=dict)
    interference: Interference | None = None  # interfered retrieval's virtual-update scores


StrategyFactory = Callable[[StrategyContext], Strategy]


def naive(context: StrategyContext) -> Strategy:
    return Naive()


def experience_replay(context: StrategyContext) -> Strategy:
    return ExperienceReplay(
        context.memory(),
        context.replay_size,
        seed=context.seed + 2,
        interference=context.interference,
    )


def online_ewc(context: StrategyContext) -> Strategy:
    s = context.settings
    return OnlineEWC(s["lambda_"], decay=s["decay"], gamma=s["gamma"], anchor_lag=s["anchor_lag"])


def packnet(context: StrategyContext) -> Strategy:
    s = context.settings
    return PackNet(
        context.spec.num_classes, prune_fraction=s["prune_fraction"], multi_head=s["multi_head"]
    )


STRATEGIES: Registry[StrategyFactory] = Registry(
    "strategy",
    {"naive": naive, "er": experience_replay, "ewc": online_ewc, "packnet": packnet},
    required=(
        "task_aware",
        "prepare",
        "masks",
        "after_backward",
        "penalty",
        "before_step",
        "after_step",
        "after_update",
        "consolidate",
        "state_dict",
        "load_state_dict",
    ),
)
"""Strategies by name; their registration order is the order they compose in."""


@dataclass(frozen=True)
class FilterContext:
    """What a filter factory builds from: the stream's contract, the noise settings by
    field name, and the replay memory (None without one) whose index neighbour search
    may cover."""

    spec: StreamSpec
    settings: Mapping[str, Any]
    memory: ReplayBuffer | None = None


FilterFactory = Callable[[FilterContext], Filter]


def neighbour_agreement(context: FilterContext) -> Filter:
    s = context.settings
    knn = NeighbourAgreement(
        embedding_dim(context.spec.feature_size),
        s["knn_k"],
        s["knn_window"],
        min_agreement=s["knn_min_agreement"],
        min_plurality=s["knn_min_plurality"],
    )
    knn.neighbours = IndexNeighbours(knn.window, context.memory)
    return knn


def small_loss(context: FilterContext) -> Filter:
    s = context.settings
    return SmallLoss(
        context.spec.num_classes,
        warmup=s["warmup"],
        window=s["loss_window"],
        min_class_samples=s["min_class_samples"],
        min_separation=s["min_separation"],
    )


FILTERS: Registry[FilterFactory] = Registry(
    "noise filter",
    {"knn": neighbour_agreement, "small-loss": small_loss},
    required=("name", "judge", "observe", "restart", "state_dict", "load_state_dict"),
)
"""Label-noise filters by name, in the order they judge."""
