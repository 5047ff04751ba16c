"""Validated settings for the learner and for `replay`, and loading them from files.

A config file (YAML or TOML) may hold any command-line flag, spelled with hyphens or
underscores; flags and their environment variables override it.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from streamcl.ingest.errors import ConfigError
from streamcl.ingest.registry import Registry, is_plugin
from streamcl.ingest.schema import StreamSpec
from streamcl.learner.tasks import DEFAULT_TASK_WINDOW

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib


def _ints_from_text(value: Any) -> Any:
    """Accept `28,28` (a flag or an environment variable) as well as a list."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


REGISTRIES = {
    "strategies": "streamcl.learner.registry",
    "filters": "streamcl.learner.registry",
    "selectors": "streamcl.memory.selectors",
    "retrievals": "streamcl.memory.retrieval",
}
"""Where each pluggable part's registry lives (a module attribute of the upper-cased name)."""


def _registry(name: str) -> Registry[Any]:
    """The registry of a pluggable part, imported when a value is checked, not with this
    module: the parts pull in torch and faiss, which `streamcl --help` need not load."""
    registry: Registry[Any] = getattr(importlib.import_module(REGISTRIES[name]), name.upper())
    return registry


def _registered(registry: Registry[Any], value: str) -> str:
    """A name in `registry` or a `package.module:function` (imported when the learner is built)."""
    if registry.known(value):
        return value
    raise ValueError(f"{registry.kind} must be {registry.describe()}, got {value!r}")


class EwcConfig(BaseModel):
    """Online EWC: running Fisher `decay`, carry-over `gamma`, penalty strength `lambda`."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    lambda_: float = Field(100.0, ge=0, alias="lambda", description="penalty strength")
    decay: float = Field(0.99, ge=0, lt=1, description="running Fisher: EMA factor per update")
    gamma: float = Field(1.0, ge=0, le=1, description="old consolidated Fisher kept per boundary")
    consolidate_every: int | None = Field(
        10_000, ge=1, description="samples between consolidations without task ids or detector"
    )
    anchor_lag: int = Field(
        20, ge=0, description="updates: anchor on a snapshot this old (detectors fire late)"
    )


class PackNetConfig(BaseModel):
    """Parameter isolation: share of a task's free weights released at its boundary."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prune_fraction: float = Field(0.5, gt=0, lt=1)
    multi_head: bool = Field(True, description="restrict logits to the classes of the task")


class DetectorConfig(BaseModel):
    """Boundary detection on the prequential error (or loss) and on unseen classes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["none", "page-hinkley", "adwin"] = "none"
    signal: Literal["error", "loss"] = "error"
    new_classes: bool = Field(True, description="a class never seen before is a boundary")
    min_gap: int = Field(500, ge=0, description="events closer than this many samples merge")
    threshold: float = Field(50.0, gt=0, description="page-hinkley: alarm level (lambda)")
    delta: float = Field(0.02, ge=0, description="page-hinkley: tolerated change")
    min_instances: int = Field(30, ge=1, description="page-hinkley: samples before any alarm")
    alpha: float = Field(1.0, gt=0, le=1, description="page-hinkley: forgetting factor")
    confidence: float = Field(0.002, gt=0, lt=1, description="adwin: significance delta")


class NoiseConfig(BaseModel):
    """Label-noise filters on arrivals (learner/filters.py); suspects go to quarantine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    knn: bool | Literal["auto"] = Field(
        "auto",
        description="flag labels that are not their neighbours' plurality; auto: with a "
        "replay memory (er) only: without one, on a clean permuted stream, it cost EWC 5 "
        "points (README, Dirty streams)",
    )
    knn_k: int = Field(10, ge=1, description="neighbours per query")
    knn_window: int = Field(1000, ge=1, description="recent arrivals searched besides memory")
    knn_min_agreement: float = Field(
        0.2, ge=0, le=1, description="flag only labels fewer than this share of neighbours carry"
    )
    knn_min_plurality: float = Field(
        0.5,
        ge=0,
        le=1,
        description="flag only when another label holds at least this share of neighbours "
        "(a near-uniform neighbourhood, as on a new domain, judges nothing)",
    )
    small_loss: bool = Field(True, description="flag the high-loss mode of recent losses")
    memory_agreement: bool = Field(
        True,
        description="with a filter on, the replay memory takes an admitted arrival only "
        "when the model, scoring it as the training loss does, already predicts its label "
        "(noisy labels the filters let through rarely agree)",
    )
    warmup: int = Field(1000, ge=0, description="small-loss: arrivals before it judges")
    loss_window: int = Field(2000, ge=10, description="small-loss: recent losses it models")
    min_class_samples: int = Field(
        100, ge=0, description="small-loss: admitted samples of a label before it is judged"
    )
    min_separation: float = Field(
        2.0, gt=0, description="small-loss: Ashman's D the two loss modes must reach"
    )
    extra: str = Field(
        "",
        description="more filters, judging after knn and small-loss: registered names or "
        "'package.module:function' joined by + (learner/registry.py)",
    )

    @field_validator("extra")
    @classmethod
    def _known_filters(cls, value: str) -> str:
        filters = _registry("filters")
        return "+".join(_registered(filters, part.strip()) for part in value.split("+") if part)

    @property
    def extra_filters(self) -> tuple[str, ...]:
        return tuple(self.extra.split("+")) if self.extra else ()


class QuarantineConfig(BaseModel):
    """Where suspects wait for re-examination by the model (learner/quarantine.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    capacity: int = Field(1000, ge=0, description="samples held; the oldest are judged beyond")
    recheck_after: int = Field(1000, ge=0, description="arrivals before a re-examination")
    max_checks: int = Field(2, ge=1, description="failed examinations before final rejection")


class LossConfig(BaseModel):
    """The training loss (learner/losses.py): robust loss, imbalance and recency corrections."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    robust: Literal["ce", "gce", "sce"] = "ce"
    gce_q: float = Field(0.7, gt=0, le=1)
    sce_alpha: float = Field(0.1, ge=0)
    sce_beta: float = Field(1.0, ge=0)
    ace: bool = Field(True, description="ER-ACE: new rows' loss over the present classes only")
    ace_recent_share: float = Field(
        0.05,
        gt=0,
        le=1,
        description="ER-ACE: classes also count as present while they hold this share of the "
        "last ~200 admitted arrivals; 1: the batch's classes only, as in the paper (0.05 "
        "helps with the kNN filter on, hurt without it: README, Dirty streams)",
    )
    logit_adjust_tau: float = Field(
        1.0, ge=0, description="logit adjustment by running priors; 1 = balanced softmax, 0 off"
    )
    reweight: Literal["none", "effective-number"] = "none"
    reweight_beta: float = Field(0.999, gt=0, lt=1)


REPLAY_PER_NEW_SAMPLE = 3
"""Default replay draws per arriving sample in a step. Split Fashion-MNIST 5 x 2, MLP
400-400, memory 1000, defaults otherwise, 3 seeds: 1 / 2 / 3 / 4 draws per new sample gave
clean 0.808 / 0.815 / 0.820 / 0.816, imbalance 10 0.776 / 0.799 / 0.800 / 0.805, 40 % noise
0.793 / 0.807 / 0.807, 40 % noise with imbalance 10 0.783 / 0.782 / 0.786. A step on 40
rows instead of 20 costs throughput (benchmarks/throughput.py, `defaults` against
`er-default`); `--replay-size 10` gives it back."""
PLAIN_LEARNING: dict[str, Any] = {
    "noise": {"knn": False, "small_loss": False},
    "loss": {"ace": False, "logit_adjust_tau": 0.0},
}
"""Learner settings with the dirty-stream corrections off (noise filters, ER-ACE, logit
adjustment): textbook cross entropy, for measuring one strategy against textbook
baselines such as plain fine-tuning, which those corrections would otherwise blur."""


class LearnerConfig(BaseModel):
    """Everything that shapes the online learner; stored in reports and checkpoints."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: str = Field(
        "er",
        description="how to learn: naive (fine-tune on arrivals only), or parts joined by "
        "'+': er (experience replay), ewc (online EWC), packnet (parameter isolation; task "
        "ids at train and test time) or your own 'package.module:function' "
        "(learner/registry.py), e.g. er+ewc",
    )
    model: str = Field(
        "mlp",
        description="the network: mlp, cnn, or your own 'package.module:function' "
        "returning an nn.Module",
    )
    hidden: tuple[Annotated[int, Field(ge=1)], ...] = Field(
        (256, 256), description="MLP hidden layer widths, comma separated"
    )
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="optimizer of the weights")
    lr: float = Field(0.1, gt=0, description="learning rate")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum")
    batch_size: int = Field(10, ge=1, description="new samples per update")
    steps_per_batch: int = Field(1, ge=1, description="optimizer steps per incoming batch")
    memory: int = Field(1000, ge=1, description="replay memory capacity in items")
    memory_policy: str = Field(
        "class-balanced",
        description="which exemplars the memory keeps when full: reservoir, class-balanced "
        "or 'package.module:function' (memory/selectors.py)",
    )
    memory_retrieval: str = Field(
        "uniform",
        description="how replay draws from memory (memory/retrieval.py): uniform, "
        "class-balanced, neighbours (half the draws among other-class items nearest "
        "the incoming batch, via FAISS), interfered (of the items nearest the batch, those "
        "whose loss a virtual update on it raises most) or 'package.module:function'",
    )
    memory_dedup: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="refresh a same-class item closer than this share of the class's "
        "typical nearest distance instead of storing a near duplicate; 0 off",
    )
    memory_embedding: Literal["auto", "input", "penultimate"] = Field(
        "auto",
        description="what the memory's FAISS index holds: the model's penultimate features "
        "(refreshed on the memory_refresh budget) or pooled inputs (never stale); auto: "
        "penultimate when dedup, a memory head or an index retrieval reads it, else inputs "
        "(the kNN noise filter's space, so it searches the memory too)",
    )
    memory_refresh: int = Field(
        10,
        ge=0,
        description="penultimate embedding: stored items re-embedded per update, round-robin; "
        "every item is re-embedded at each task boundary as well",
    )
    memory_condensed: int = Field(
        0,
        ge=0,
        description="condensed exemplars kept per class: k-means centroids, refined by "
        "distribution matching when memory_condensed_steps > 0; taken out of `memory` "
        "(memory/condensed.py); 0 off",
    )
    memory_condensed_steps: int = Field(
        0,
        ge=0,
        le=1000,
        description="condensed exemplars: distribution-matching steps per update of a "
        "class, after its k-means update (0: k-means only; DM at 5 measured below k-means, "
        "benchmarks/results/memory-condensed.json)",
    )
    memory_condensed_every: int | None = Field(
        None,
        ge=1,
        description="condensed exemplars: arrivals of a class between its updates "
        "(default: its window, 20 x memory_condensed recent arrivals)",
    )
    predict_head: Literal["softmax", "ncm", "knn"] = Field(
        "softmax",
        description="predict (evaluation, /predict) with the model (softmax) or from the "
        "replay memory's exemplars: nearest class mean (ncm) or a 10-nearest-neighbour "
        "vote (knn)",
    )
    replay_size: int | None = Field(
        None, ge=0, description="replay draws per step (default: 3 x the batch size)"
    )
    device: str = Field(
        "auto", description="where to compute: auto (CUDA when present), cpu, cuda or cuda:N"
    )
    threads: int = Field(
        1, ge=1, description="PyTorch CPU threads; 1 is fastest for small online models"
    )
    seed: int = Field(0, description="seed for every random choice")
    use_task_ids: bool = Field(
        True,
        description="show the stream's task ids to the learner; off: task-free learning "
        "(the held-out probes are still grouped by task)",
    )
    task_window: int = Field(
        DEFAULT_TASK_WINDOW,
        ge=1,
        description="samples: a task id not seen for this long starts a task (a boundary); "
        "flips between tasks seen within it are interleaved partitions, not changes",
    )
    ewc: EwcConfig = Field(default_factory=EwcConfig, description="online EWC (strategy ewc)")
    packnet: PackNetConfig = Field(
        default_factory=PackNetConfig, description="parameter isolation (strategy packnet)"
    )
    detector: DetectorConfig = Field(
        default_factory=DetectorConfig,
        description="task-boundary detector (kind: none, page-hinkley, adwin; signal: error, loss)",
    )
    noise: NoiseConfig = Field(default_factory=NoiseConfig, description="label-noise filters")
    quarantine: QuarantineConfig = Field(
        default_factory=QuarantineConfig, description="quarantine of suspect samples"
    )
    loss: LossConfig = Field(
        default_factory=LossConfig,
        description="training loss (robust: ce, gce, sce; ace: ER-ACE; logit_adjust_tau: "
        "0 off, 1 balanced softmax; reweight: none, effective-number)",
    )

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        """Accept '+'-joined parts in any order; store them in composition order: the
        registered ones in registration order, then plug-ins in the order given."""
        parts = [part.strip() for part in value.split("+")]
        parts = [part if is_plugin(part) else part.lower() for part in parts]
        strategies = _registry("strategies")
        if not all(strategies.known(part) for part in parts):
            builtins = ", ".join(name for name in strategies.names() if name != "naive")
            raise ValueError(
                f"strategy must be naive or parts of {builtins} or 'package.module:function' "
                f"joined by '+' (e.g. er+ewc), got {value!r}"
            )
        if len(set(parts)) != len(parts):
            raise ValueError(f"strategy names a part twice: {value!r}")
        if "naive" in parts and len(parts) > 1:
            raise ValueError(f"naive combines with nothing, got {value!r}")
        registered = [name for name in strategies.names() if name in parts]
        return "+".join(registered + [part for part in parts if is_plugin(part)])

    @field_validator("memory_policy")
    @classmethod
    def _known_selector(cls, value: str) -> str:
        return _registered(_registry("selectors"), value)

    @field_validator("memory_retrieval")
    @classmethod
    def _known_retrieval(cls, value: str) -> str:
        return _registered(_registry("retrievals"), value)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value in ("mlp", "cnn") or is_plugin(value):
            return value
        raise ValueError(f"model must be mlp, cnn or 'package.module:function', got {value!r}")

    _hidden_from_text = field_validator("hidden", mode="before")(_ints_from_text)

    @model_validator(mode="after")
    def _isolation_has_boundaries(self) -> LearnerConfig:
        if "packnet" in self.parts and not self.use_task_ids and self.detector.kind == "none":
            raise ValueError(
                "packnet needs task ids or a boundary detector: use_task_ids is off and "
                "detector.kind is none"
            )
        return self

    @model_validator(mode="after")
    def _memory_head_has_memory(self) -> LearnerConfig:
        if self.predict_head != "softmax" and "er" not in self.parts:
            raise ValueError(f"predict_head {self.predict_head} needs the er strategy's memory")
        return self

    @property
    def knn_filter(self) -> bool:
        """`noise.knn` resolved: auto is on when the strategy keeps a replay memory."""
        knn = self.noise.knn
        return "er" in self.parts if knn == "auto" else knn

    @property
    def memory_indexed(self) -> bool:
        """Whether the replay memory needs its FAISS index for something besides retrieval
        (whose policy says so itself: `Retrieval.needs_index`)."""
        return self.knn_filter or self.memory_dedup > 0 or self.predict_head != "softmax"

    @property
    def memory_embedding_space(self) -> Literal["input", "penultimate"]:
        """`memory_embedding` resolved: on Split Fashion-MNIST penultimate features served
        dedup, retrieval and the memory heads better (README, "Replay memory"), and the kNN
        filter searching the memory as pooled inputs served noisy streams better (0.737
        against 0.668 with noise and imbalance, 3 seeds)."""
        if self.memory_embedding != "auto":
            return self.memory_embedding
        retrieval = _registry("retrievals").create(self.memory_retrieval)
        feature_users = self.memory_dedup > 0 or self.predict_head != "softmax"
        return "penultimate" if feature_users or retrieval.needs_index else "input"

    @property
    def parts(self) -> tuple[str, ...]:
        """The strategy's parts in composition order, e.g. ('er', 'ewc')."""
        return tuple(self.strategy.split("+"))

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or value.startswith("cuda:"):
            return value
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")

    @property
    def replay_draws(self) -> int:
        if self.replay_size is None:
            return REPLAY_PER_NEW_SAMPLE * self.batch_size
        return self.replay_size


class ReplayConfig(LearnerConfig):
    """`streamcl replay`: the learner plus where the stream is and what to write."""

    stream: Path = Field(description="recorded stream file to replay")
    heldout: Path | None = Field(
        None, description="held-out set (default: STREAM.eval.npz beside the stream)"
    )
    report: Path | None = Field(None, description="write the JSON report here")
    plots: Path | None = Field(
        None,
        description="write PNG plots (accuracy matrix, accuracy over time) to this directory",
    )
    eval_every: int | None = Field(
        None, ge=1, description="also evaluate every N learned samples (task boundaries always are)"
    )
    prequential_window: int = Field(
        1000, ge=1, description="recent samples the prequential accuracy is taken over"
    )
    stop_after: int | None = Field(
        None, ge=0, description="stop after this many messages and save the run to checkpoint"
    )
    checkpoint: Path | None = Field(
        None,
        description="where stop_after saves the run (learner, session, stream position)",
    )
    resume: Path | None = Field(
        None, description="continue a run saved by stop_after (same settings required)"
    )
    allow_partial: bool = Field(
        False,
        description="accept a damaged or truncated stream: learn from what is readable and "
        "exit 0 (without it such a replay writes its report, then exits 2)",
    )

    @model_validator(mode="after")
    def _stop_needs_checkpoint(self) -> ReplayConfig:
        if (self.stop_after is None) != (self.checkpoint is None):
            raise ValueError("stop_after and checkpoint go together")
        return self


def validated(model: type[BaseModel], values: dict[str, Any], source: str | None = None) -> Any:
    """Build `model` from `values`, turning pydantic's error into a one-line `ConfigError`.

    `source` names the file the values came from. An unknown key is answered with where
    it belongs (a section of `model` that has it) or the closest known key.
    """
    try:
        return model(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as err:
        problems = "; ".join(_problem(model, error) for error in err.errors())
        where = f" in {source}" if source else ""
        raise ConfigError(f"invalid settings{where}: {problems}") from err


def _problem(model: type[BaseModel], error: Any) -> str:
    loc = tuple(str(part) for part in error["loc"])
    key = ".".join(loc) or "config"
    if error["type"] == "extra_forbidden":
        return f"{key}: {unknown_key_hint(model, loc)}"
    return f"{key}: {error['msg'].removeprefix('Value error, ')}"


def unknown_key_hint(model: type[BaseModel], loc: tuple[str, ...]) -> str:
    """Say where an unknown key at `loc` belongs, or which known key it resembles."""
    parent: type[BaseModel] | None = model
    for part in loc[:-1]:
        field = parent.model_fields.get(part) if parent is not None else None
        parent = _section(field.annotation) if field is not None else None
    if parent is None:
        return "unknown setting"
    name = loc[-1]
    prefix = ".".join(loc[:-1])
    for section, field in parent.model_fields.items():
        nested = _section(field.annotation)
        if nested is not None and name in _keys(nested):
            place = f"{prefix}.{section}" if prefix else section
            return f"not a setting here; it belongs under {place}: ({place}.{name})"
    close = difflib.get_close_matches(name, sorted(_keys(parent)), n=1)
    return f"unknown setting (did you mean {close[0]}?)" if close else "unknown setting"


def _section(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _keys(model: type[BaseModel]) -> set[str]:
    """Field names and their aliases (`lambda` for `lambda_`)."""
    return {field.alias or name for name, field in model.model_fields.items()}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML file of settings; keys may use hyphens or underscores."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ConfigError(
            f"config file {path} is not valid {path.suffix or 'YAML'}: {err}"
        ) from err
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(raw).__name__}")
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


class KafkaConfig(BaseModel):
    """Where the service reads from; security settings pass straight to kafka-python."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="Kafka bootstrap servers, comma separated"
    )
    topic: str = Field("streamcl.samples", description="topic the samples arrive on")
    group_id: str = Field("streamcl", description="consumer group the learner joins")
    dead_letter_topic: str | None = Field(None, description="default: <topic>.dlq")
    quarantine_topic: str | None = Field(
        None, description="suspect-label samples, reason in headers; default: <topic>.quarantine"
    )
    client_id: str = "streamcl"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="how clients talk to the brokers"
    )
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: SecretStr | None = None
    consumer: dict[str, Any] = Field(default_factory=dict, description="extra consumer settings")
    producer: dict[str, Any] = Field(default_factory=dict, description="extra producer settings")
    poll_timeout_ms: int = Field(200, ge=1)
    max_records: int = Field(500, ge=1)
    on_unreadable: Literal["skip", "stop"] = Field(
        "skip",
        description="a record batch the client cannot decode: dead-letter its offset range "
        "and skip it, or stop once with an error naming it",
    )
    connect_timeout_s: float = Field(
        30.0,
        gt=0,
        description="seconds to wait at start-up for a bootstrap server before failing",
    )
    side_topic_partitions: int | None = Field(
        None,
        ge=1,
        description="partitions of the dead-letter and quarantine topics when streamcl "
        "creates them; default: as many as the source topic (1 if it does not exist yet). "
        "A message from source partition p goes to partition p mod this count, so each "
        "keeps its source order",
    )
    side_topic_replication: int = Field(
        -1, description="replication factor of topics streamcl creates; -1: the broker's default"
    )
    rebalance: Literal["cooperative", "eager"] = Field(
        "cooperative",
        description="group protocol: cooperative (cooperative-sticky: a join or leave moves "
        "only the partitions that change owner) or eager (range/round-robin, kafka-python's "
        "default: every rebalance revokes everything); all members must share it",
    )


class StreamSpecConfig(BaseModel):
    """The contract every message must meet (shape, dtype, number of classes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    feature_shape: tuple[int, ...] = Field(
        (28, 28), description="declared sample shape, comma separated"
    )
    dtype: Literal["uint8", "float32"] = Field("uint8", description="feature dtype on the wire")
    num_classes: int = Field(10, ge=2, description="labels lie in [0, num_classes)")

    _shape_from_text = field_validator("feature_shape", mode="before")(_ints_from_text)

    @model_validator(mode="after")
    def _is_a_spec(self) -> StreamSpecConfig:
        try:
            self.to_spec()
        except ConfigError as err:
            raise ValueError(str(err)) from err
        return self

    def to_spec(self) -> StreamSpec:
        """The validated contract (ingest's `StreamSpec` is its one definition)."""
        return StreamSpec(self.feature_shape, self.dtype, self.num_classes)


class CheckpointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dir: Path = Field(Path("runs/checkpoints"), description="where checkpoints are written")
    every_updates: int = Field(500, ge=1)
    every_seconds: float = Field(60.0, gt=0)
    keep: int = Field(3, ge=1, description="checkpoints kept; the volume must hold keep + 1")
    retry_min_seconds: float = Field(
        1.0, gt=0, description="after a failed write, first retry; doubles per failure"
    )
    retry_max_seconds: float = Field(60.0, gt=0, description="longest wait between retries")
    max_age_seconds: float = Field(
        900.0, gt=0, description="alert StreamclCheckpointStale: unsaved learning older than this"
    )

    @model_validator(mode="after")
    def _retry_range(self) -> CheckpointConfig:
        if self.retry_max_seconds < self.retry_min_seconds:
            raise ValueError("retry_max_seconds must be >= retry_min_seconds")
        return self


class ResumeConfig(BaseModel):
    """Where to start when the checkpoint's offsets and the topic or the group disagree."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out_of_range: Literal["refuse", "earliest", "latest"] = Field(
        "refuse",
        description="a checkpoint offset outside the partition's log: exit, or reset there",
    )
    without_checkpoint: Literal["committed", "beginning"] = Field(
        "committed",
        description="no checkpoint: the group's committed offsets, or the start of the log",
    )


class SnapshotConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dir: Path | None = Path("runs/snapshots")
    every_updates: int = Field(2000, ge=1)
    keep: int = Field(3, ge=1)


class HttpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="address of /healthz, /readyz and /predict")
    port: int = Field(
        8080, ge=0, le=65535, description="port of /healthz, /readyz and /predict; 0: any free"
    )
    stall_seconds: float = Field(60.0, gt=0, description="/healthz fails after this long idle")
    backlog: int = Field(128, ge=1, description="connections the kernel queues before accept")
    workers: int = Field(8, ge=1, description="threads answering requests")
    queue: int = Field(256, ge=0, description="accepted requests waiting for a worker; more: 503")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1, description="larger bodies get 413")


class ProbeConfig(BaseModel):
    """A held-out probe diverted from the stream, used when no `heldout` file is given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fraction: float = Field(0.01, ge=0, lt=1, description="share held out; 0 disables")
    per_class: int = Field(200, ge=1)


class ServiceConfig(BaseModel):
    """`streamcl serve`: a learner fed from Kafka, checkpointed against its offsets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    spec: StreamSpecConfig = Field(default_factory=StreamSpecConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    resume: ResumeConfig = Field(default_factory=ResumeConfig)
    snapshot: SnapshotConfig = Field(default_factory=SnapshotConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    heldout: Path | None = Field(
        None, description="held-out set (.eval.npz) to evaluate at task boundaries"
    )
    report: Path | None = Field(None, description="write the JSON report here on exit")
    audit_log: Path | None = Field(
        None, description="append every learned (partition, offset) as JSON lines"
    )
    until_idle: float | None = Field(
        None,
        gt=0,
        description="exit once no message arrived for this many seconds while partitions "
        "were assigned and there is no lag (default: run until stopped); exit 1 if this run "
        "learned nothing",
    )
    eval_every: int | None = Field(
        None, ge=1, description="also evaluate every N learned samples (task boundaries always are)"
    )
    prequential_window: int = Field(
        1000, ge=1, description="recent samples the prequential accuracy is taken over"
    )
    log_every: float = Field(
        10.0,
        ge=0,
        description="seconds between progress log lines (samples/s, lag, accuracy); 0: none",
    )
