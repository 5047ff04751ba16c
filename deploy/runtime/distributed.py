"""Scale-out: `streamcl serve` as several learner ranks over one topic's partitions.

Launch with `torchrun --nproc-per-node N -m streamcl.deploy.cli serve --config service.yaml` (or any
launcher that sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT). Rank r owns partition p
when p mod N = r (`owned_partitions`), assigned directly, not through the consumer group's
protocol: the ranks must stay in lock step anyway, so a rebalance could only stop them, and
the group protocol brought its own failures on restart (Tansu 0.6.0 kept a departed leader
in the group and SyncGroup never completed; kafka-python now and then left a joining member
unassigned). Offsets are still committed to the service's group, so lag tools see it; no
other consumer may consume in that group meanwhile. The ranks train one model through
collectives (gloo on CPU, NCCL on CUDA).

Gradients: an explicit all-reduce in an optimizer step pre-hook, not
DistributedDataParallel. DDP all-reduces inside `backward` and needs every rank to run the
same number of backward passes on the same module; our loop adds penalty gradients (EWC)
outside autograd, skips the step when the noise filter holds back a whole
batch, and a rank whose partitions run dry has no batch at all. Here every optimizer step of
any rank is one all-reduce of one flat buffer (all gradients, a "contributes" flag and a
"working" flag): ranks that step contribute their gradients, the rest contribute zeros and
apply the same averaged step, so every rank holds bit-identical parameters and optimizer
state. Each tick (one poll and what it learns) ends with every rank repeating zero
all-reduces until no rank is working (`GradientSync.finish_tick`), so ranks that learned
different numbers of batches never wait on each other's collectives. The average is over
contributing ranks, so one rank alone learns exactly as the single-process service does.

Budgets: the configured `learner.batch_size`, `learner.memory` and replay draws are global;
rank r takes an even share (`share`), so one global step averages as many arriving samples
and replay draws as a single process would learn in one step, and the ranks' memories
together never exceed the budget. Settings counted in arrivals are global in the same way
(the task window, the noise filters' warm-up, loss and kNN windows and per-class minimum,
the quarantine's capacity and re-check delay): a rank sees about 1/N of the arrivals, so
with its share it judges as much of the stream as one process would. Each rank keeps its
own class-balanced memory of its own partitions; with samples spread over partitions by key
(or round robin), every rank sees every class, so class balance holds per rank and
therefore globally.

Checkpoints: one global checkpoint after all ranks reach the same tick: rank 0 gathers every
rank's learner state (its memory, filters, quarantine), session counters and handled
offsets, writes one file with one copy of the (identical) model and optimizer, and only
once it is durable does each rank commit its own partitions' offsets. A restart with the
same rank count gives rank r its own state back; every rank seeks its partitions to the
checkpoint's offsets, so nothing is skipped. With another rank count
(2 -> 1, 1 -> 2, ...): the model, optimizer and offsets are shared anyway; the ranks'
memories are pooled and dealt again (item j to new rank j mod N, each rank admitting them
through its own selection up to its new share); new rank r continues old rank r's filters
and counters (new ranks start fresh), and old ranks beyond the new count must hold no
pending or quarantined samples (else a one-line error asks for the old count first).

Failures: a rank that dies fails the group's next collective; the launcher (torchrun's
elastic restart) starts the group again from the last checkpoint. Partitions added to the
topic stop the ranks the same way, so the restarted group splits them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from streamcl.deploy.runtime.commits import check_compatible, one_line
from streamcl.deploy.runtime.config import LearnerConfig, ServiceConfig
from streamcl.deploy.runtime.metrics import ServiceMetrics
from streamcl.deploy.runtime.service import Service
from streamcl.ingest.errors import ConfigError, StreamclError
from streamcl.ingest.kafka import Arrival, KafkaSourceError, Offsets, take
from streamcl.ingest.schema import Batch
from streamcl.learner.checkpoint import CheckpointError
from streamcl.learner.loop import OnlineLearner

log = logging.getLogger(__name__)
CHECKPOINT_KIND = "streamcl-distributed/1"
PARTITIONS_TIMEOUT_S = 120.0
"""How long rank 0 waits for the topic's metadata (it may be created after the ranks start)."""
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
"""A rank stuck this long in a collective fails (the launcher restarts the group)."""


class DistributedError(StreamclError):
    """The ranks cannot go on together (the group's assignment changed, bad rank count)."""


def launched() -> bool:
    """True under torchrun (or a launcher setting its variables) with more than one rank
    or an explicit RANK: then `serve` runs as one rank of a group."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def share(total: int, rank: int, world: int) -> int:
    """Rank `rank`'s even share of `total` (the first `total % world` ranks get one more)."""
    return total // world + (1 if rank < total % world else 0)


def rank_path(path: Path | None, rank: int) -> Path | None:
    """Rank 0 keeps `path`; rank r writes beside it as `<stem>.rank<r><suffix>`."""
    if path is None or rank == 0:
        return path
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def rank_config(
    config: ServiceConfig, rank: int, world: int, local_rank: int | None = None
) -> ServiceConfig:
    """The settings one rank runs with: its share of the budgets, its own files and port.

    The port is `http.port + local_rank` (the rank on its machine, torchrun's LOCAL_RANK;
    default `rank`): ranks on one machine need distinct ports, while one rank per pod
    (deploy/k8s/multirank) keeps the same port, probes and scrape target on every pod.
    """
    learner = config.learner
    if learner.batch_size < world or learner.memory < world:
        raise ConfigError(
            f"learner.batch_size ({learner.batch_size}) and learner.memory ({learner.memory}) "
            f"are global budgets split over the ranks: each must be at least the number of "
            f"ranks ({world})"
        )
    if "packnet" in learner.parts:
        raise ConfigError(
            "strategy packnet keeps per-rank pruning masks that change the weights after each "
            "step: it cannot run on several ranks; use er and/or ewc"
        )

    def part(total: int, least: int = 0) -> int:
        return max(least, share(total, rank, world))

    # Counts of arrivals are global too: a rank sees about 1/world of them, so a filter that
    # waited for 1,000 arrivals of its own would wait for world x 1,000 of the stream's
    # (on a short task, for ever: it never judged, while one process did).
    noise, quarantine = learner.noise, learner.quarantine
    ranked = learner.model_copy(
        update={
            "batch_size": share(learner.batch_size, rank, world),
            "memory": share(learner.memory, rank, world),
            "replay_size": share(learner.replay_draws, rank, world),
            "task_window": part(learner.task_window, 1),
            "noise": noise.model_copy(
                update={
                    "warmup": part(noise.warmup),
                    "loss_window": part(noise.loss_window, 10),
                    "min_class_samples": part(noise.min_class_samples),
                    "knn_window": part(noise.knn_window, 1),
                }
            ),
            "quarantine": quarantine.model_copy(
                update={
                    "capacity": part(quarantine.capacity),
                    "recheck_after": part(quarantine.recheck_after),
                }
            ),
        }
    )
    http = config.http
    local = rank if local_rank is None else local_rank
    port = http.port + local if http.port else 0
    return config.model_copy(
        update={
            "learner": ranked,
            "http": http.model_copy(update={"port": port}),
            "audit_log": rank_path(config.audit_log, rank),
            "report": rank_path(config.report, rank),
        }
    )


class GradientSync:
    """Average gradients over the ranks at every optimizer step (see the module docstring)."""

    def __init__(self, learner: OnlineLearner, metrics: ServiceMetrics):
        self.learner = learner
        self.metrics = metrics  # step and communication seconds, as they accrue
        self.params = [p for p in learner.model.parameters() if p.requires_grad]
        self.device = learner.device
        self.communication_seconds = 0.0
        self.joining_seconds = 0.0  # in finish_tick: others' steps and the closing round
        self.collectives = 0
        self._idle = False
        learner.optimizer.register_step_pre_hook(self._before_step)

    def _before_step(self, _optimizer: object, _args: object, _kwargs: object) -> None:
        if not self._idle:  # a working rank's own step: contribute its gradients
            self._exchange(contributes=True)

    def _exchange(self, contributes: bool) -> bool:
        """All-reduce gradients and flags; set the averaged gradients. False: nobody worked."""
        grads = [
            p.grad.reshape(-1)
            if contributes and p.grad is not None
            else torch.zeros_like(p).view(-1)
            for p in self.params
        ]
        flags = torch.full((2,), float(contributes), dtype=grads[0].dtype, device=self.device)
        buffer = torch.cat([*grads, flags])
        began = time.perf_counter()
        dist.all_reduce(buffer)
        seconds = time.perf_counter() - began
        self.communication_seconds += seconds
        self.metrics.communication_seconds.inc(seconds)
        self.collectives += 1
        contributors = int(buffer[-2].item())
        if contributors == 0:
            return False
        averaged = buffer[:-2] / contributors
        start = 0
        for p in self.params:
            size = p.numel()
            p.grad = averaged[start : start + size].view_as(p).clone()
            start += size
        return True

    def finish_tick(self) -> None:
        """Join the other ranks' remaining steps (applying each) until no rank is working."""
        learner = self.learner
        self._idle = True
        began = time.perf_counter()
        try:
            while self._exchange(contributes=False):
                for strategy in learner.strategies:
                    strategy.before_step(learner.model)
                learner.optimizer.step()
                for strategy in learner.strategies:
                    strategy.after_step(learner.model)
                learner.updates += 1
        finally:
            self._idle = False
            seconds = time.perf_counter() - began
            self.joining_seconds += seconds
            # Own updates reach streamcl_step_seconds through the exporter (`learned`).
            self.metrics.step_seconds.inc(seconds)

    def broadcast_model(self) -> None:
        """Give every rank rank 0's parameters and buffers (identical start)."""
        for tensor in self.learner.model.state_dict().values():
            dist.broadcast(tensor, src=0)


@dataclass(frozen=True)
class Decision:
    """What all ranks agreed at the end of a tick."""

    stop: bool
    finished: bool
    checkpoint: bool
    repartitioned: bool


def agree(
    device: torch.device, *, stop: bool, idle: bool, due: bool, repartitioned: bool
) -> Decision:
    """One small all-reduce: stop if any rank must, finish when all are idle."""
    world = dist.get_world_size()
    votes = torch.tensor(
        [float(stop), float(idle), float(due), float(repartitioned)], device=device
    )
    dist.all_reduce(votes)
    finished = int(votes[1].item()) == world
    return Decision(
        stop=votes[0].item() > 0 or finished,
        finished=finished,
        checkpoint=votes[2].item() > 0,
        repartitioned=votes[3].item() > 0,
    )


def model_digest(learner: OnlineLearner) -> str:
    """SHA-256 of the parameters' and buffers' bytes: equal on ranks with identical models."""
    digest = hashlib.sha256()
    for name, tensor in learner.model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RankService(Service):
    """One rank: a `Service` whose steps, checkpoints and stopping are agreed by all ranks."""

    def __init__(self, config: ServiceConfig, rank: int, world: int):
        self.rank, self.world = rank, world
        self.global_learner: LearnerConfig = config.learner
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        super().__init__(rank_config(config, rank, world, local_rank), rank=rank, world_size=world)
        self.sync = GradientSync(self.learner, self.metrics)
        self.batch_size = self.config.learner.batch_size  # this rank's share
        self.learn_seconds = 0.0  # in own learn calls, their all-reduces included
        self._partitions = 0  # the topic's, when the ranks split them
        self._owned: list[int] = []

    def _learned(self, batch: Batch, update_seconds: float) -> None:
        self.learn_seconds += update_seconds
        super()._learned(batch, update_seconds)

    def _checkpoint_due(self, now: float) -> bool:
        return False  # decided by all ranks at the end of each tick (`agree`)

    def restore(self) -> Offsets | None:
        """Rank 0 reads the newest checkpoint and hands every rank its part."""
        restored = self.checkpoints.store.load_latest() if self.rank == 0 else None
        box: list[Any] = [None if restored is None else (str(restored.path), restored.state)]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return None
        path, state = Path(box[0][0]), box[0][1]
        if state.get("kind") != CHECKPOINT_KIND:
            raise CheckpointError(
                f"checkpoint {path} was written by a single-process service: start the ranks "
                f"from an empty checkpoint.dir or serve it with one process"
            )
        check_compatible(json.loads(state["learner_config"]), self.global_learner, path)
        ranks = state["ranks"]
        if len(ranks) == self.world:
            mine = ranks[self.rank]
            self.learner.load_state_dict(
                {**mine["learner"], "model": state["model"], "optimizer": state["optimizer"]}
            )
            self.session.load_state_dict(mine["session"])
        else:
            self._respread(path, state)
        self.checkpoints.restored()
        self.exporter.restored(self.session)
        offsets = _union([[tuple(o) for o in r["offsets"]] for r in ranks])
        log.info(
            "restored checkpoint path=%s rank=%d ranks=%d updates=%d offsets=%s",
            path,
            self.rank,
            self.world,
            self.learner.updates,
            offsets,
        )
        return offsets

    def _respread(self, path: Path, state: dict[str, Any]) -> None:
        """Resume a checkpoint of another rank count (see the rule in the module docstring)."""
        ranks = state["ranks"]
        retired = [
            r for r, part in enumerate(ranks[self.world :], self.world) if _holds_samples(part)
        ]
        if retired:
            raise CheckpointError(
                f"checkpoint {path} was written by {len(ranks)} ranks and ranks {retired} hold "
                f"pending or quarantined samples that cannot move: resume with "
                f"--nproc-per-node {len(ranks)} until the stream is idle, then change the count"
            )
        fresh = self.learner.state_dict()
        base = ranks[self.rank]["learner"] if self.rank < len(ranks) else fresh
        strategies = [dict(s) for s in base["strategies"]]
        for mine, empty in zip(strategies, fresh["strategies"], strict=True):
            if "buffer" in mine:  # memories are pooled and dealt again below
                mine["buffer"] = empty["buffer"]
        self.learner.load_state_dict(
            {
                **base,
                "strategies": strategies,
                "model": state["model"],
                "optimizer": state["optimizer"],
                "updates": state["ranks"][0]["learner"]["updates"],
            }
        )
        if self.rank < len(ranks):
            self.session.load_state_dict(ranks[self.rank]["session"])
        if self.memory is not None:
            features, labels, tasks = _pooled_memory(ranks, self.rank, self.world)
            self.memory.add(features, labels, tasks)
        log.info(
            "re-spread a checkpoint of %d ranks over %d: rank %d holds %d memory items",
            len(ranks),
            self.world,
            self.rank,
            0 if self.memory is None else len(self.memory),
        )

    def run(self, stop: threading.Event) -> dict[str, Any]:
        started = time.monotonic()
        checkpoint = self.restore()
        # Rank 0 alone reconciles with the group's commits and the logs (one reader).
        plan: list[Any] = [self._plan(checkpoint) if self.rank == 0 else None]
        dist.broadcast_object_list(plan, src=0)
        resume: Offsets = plan[0][0]
        self._partitions = plan[0][1]
        self.sync.broadcast_model()
        self._owned = owned_partitions(self._partitions, self.rank, self.world)
        self.source.assign(resume, self._owned)
        log.info("rank %d of %d owns partitions %s", self.rank, self.world, self._owned)
        self.ready = True
        kafka = self.config.kafka
        self._learned_at_start = self.session.samples_learned
        idle_since = time.monotonic()
        backlog: list[Arrival] = []
        while True:
            waiting = sum(a.size for a in backlog)
            if waiting < kafka.max_records:  # keep fetching ahead; never wait on a backlog
                timeout = 0 if backlog else kafka.poll_timeout_ms
                backlog += self.source.poll(timeout, kafka.max_records - waiting)
            # About one batch per tick: the ranks' steps pair up in the same all-reduce
            # (each global step averages every rank's batch) instead of one rank running
            # ahead alone through a large poll.
            arrivals, backlog = take(backlog, self.batch_size)
            now = time.monotonic()
            self.last_progress = now
            self.metrics.last_poll.set(time.time())
            self._export_lag()
            with self.model_lock:
                if not arrivals and self.session.pending:
                    self.session.flush()
                if arrivals:
                    idle_since = now
                    if self._first_arrival is None:
                        self._first_arrival = now
                    self._handle(arrivals)
                self.sync.finish_tick()
            partitions = self.source.partition_count()  # 0 while metadata is refreshed
            decision = agree(
                self.learner.device,
                stop=stop.is_set(),
                idle=not backlog and self._idle(now - idle_since),
                due=self.checkpoints.due(now),
                repartitioned=partitions not in (0, self._partitions),
            )
            if decision.repartitioned:
                raise DistributedError(
                    f"the topic's partitions changed while learning (had {self._partitions}): "
                    "restart the group; it resumes from the last checkpoint and splits them again"
                )
            if decision.finished:
                log.info("every rank is idle with no lag: stopping")
                with self.model_lock:
                    self.session.flush()
                    self.sync.finish_tick()
                    self.session.evaluate()
            if decision.stop:
                break
            if decision.checkpoint:
                self.checkpoint()
        self._final_checkpoint()
        return self.report(time.monotonic() - started)

    def _idle(self, idle_seconds: float) -> bool:
        limit = self.config.until_idle
        if limit is None or idle_seconds < limit:
            return False
        return not self.source.assignment() or self._idle_enough(idle_seconds)

    def _plan(self, checkpoint: Offsets | None) -> tuple[Offsets, int]:
        """Rank 0: where every partition resumes, and how many there are to split."""
        resume = self._resume_offsets(checkpoint)
        return resume, self.source.wait_partition_count(PARTITIONS_TIMEOUT_S)

    def checkpoint(self) -> bool:
        """All ranks: flush side topics, gather state to rank 0, write, then commit.

        Collective: every rank calls it at the same tick. Returns False on every rank (and
        commits nothing) when any rank's dead letters or rank 0's write failed.
        """
        began = time.monotonic()
        with self.model_lock:
            flushed = True
            try:
                self.dead_letters.flush()
                self.quarantine_sink.flush()
            except KafkaSourceError as err:
                self.checkpoints.failed(f"dead letters not delivered error={one_line(err)}")
                flushed = False
            offsets = dict(self.source.handled)
            learner_state = self.learner.state_dict()
            del learner_state["model"], learner_state["optimizer"]
            part = {
                "flushed": flushed,
                "learner": learner_state,
                "session": self.session.state_dict(),
                "offsets": [[t, p, o] for (t, p), o in sorted(offsets.items())],
            }
            parts: list[Any] | None = [None] * self.world if self.rank == 0 else None
            dist.gather_object(part, parts, dst=0)
            outcome: list[Any] = [None]
            if parts is not None:
                outcome[0] = self._write(parts)
            dist.broadcast_object_list(outcome, src=0)
            if outcome[0] is None:
                return False
            self.checkpoints.saved()
        self.source.commit(offsets)
        self.checkpoints.committed(began)
        log.info(
            "checkpoint path=%s rank=%d updates=%d offsets=%s seconds=%.3f",
            outcome[0],
            self.rank,
            self.learner.updates,
            offsets,
            self.checkpoints.seconds,
        )
        return True

    def _write(self, parts: list[dict[str, Any]]) -> str | None:
        """Rank 0: one file for all ranks; its path, or None when it must not be committed."""
        if not all(part.pop("flushed") for part in parts):
            return None
        state = {
            "kind": CHECKPOINT_KIND,
            "model": self.learner.model.state_dict(),
            "optimizer": self.learner.optimizer.state_dict(),
            "ranks": parts,
            "learner_config": self.global_learner.model_dump_json(),
        }
        try:
            path = self.checkpoints.store.save(state)
        except Exception as err:  # as Checkpoints.checkpoint: commit nothing, retry later
            self.checkpoints.failed(f"dir={self.checkpoints.store.directory} error={one_line(err)}")
            return None
        self.metrics.checkpoint_bytes.set(path.stat().st_size)
        return str(path)

    def report(self, wall_seconds: float) -> dict[str, Any]:
        """This rank's report plus, on rank 0, every rank's key figures and the totals."""
        report = super().report(wall_seconds)
        sync = self.sync
        stepping = self.learn_seconds + sync.joining_seconds
        report["distributed"] = {
            "rank": self.rank,
            "world_size": self.world,
            "partitions": self._owned,
            "model_sha256": model_digest(self.learner),
            "optimizer_steps": self.learner.updates,
            "memory_items": 0 if self.memory is None else len(self.memory),
            "collectives": sync.collectives,
            "communication_seconds": sync.communication_seconds,
            # Of the time spent in steps (own batches and joined ones), the all-reduces'
            # share, waiting for slower ranks included.
            "communication_share": sync.communication_seconds / stepping if stepping else 0.0,
        }
        mine = {
            **report["distributed"],
            "samples_learned": report["samples_learned"],
            "samples_seen": report["samples_seen"],
            "samples_per_second": report["samples_per_second"],
        }
        everyone: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine, everyone, dst=0)
        if everyone is not None:
            report["ranks"] = everyone
            report["samples_learned_all_ranks"] = sum(r["samples_learned"] for r in everyone)
            report["samples_seen_all_ranks"] = sum(r["samples_seen"] for r in everyone)
        return report


def owned_partitions(partitions: int, rank: int, world: int) -> list[int]:
    """Rank r's partitions: every world-th from r (with fewer partitions than ranks, the
    ranks beyond them own none and contribute zero gradients)."""
    return list(range(rank, partitions, world))


def _holds_samples(part: dict[str, Any]) -> bool:
    quarantine = part["learner"]["quarantine"]
    held = int(quarantine["count"]) if quarantine is not None else 0
    return held > 0 or int(part["session"]["pending"]["count"]) > 0


def _pooled_memory(
    ranks: list[dict[str, Any]], rank: int, world: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every old rank's replay items in one pool; this rank's are every `world`-th one."""
    stores = [
        s["buffer"]["store"]
        for part in ranks
        for s in part["learner"]["strategies"]
        if "buffer" in s
    ]
    features = torch.cat([s["features"] for s in stores])[rank::world].numpy()
    labels = torch.cat([s["labels"] for s in stores])[rank::world].numpy()
    tasks = torch.cat([s["tasks"] for s in stores])[rank::world].numpy()
    return features, labels, tasks


def _union(offsets: list[list[tuple[Any, ...]]]) -> Offsets:
    """Every rank's handled offsets in one map; a partition in several takes the furthest."""
    out: Offsets = {}
    for rank_offsets in offsets:
        for topic, partition, offset in rank_offsets:
            key = (str(topic), int(partition))
            out[key] = max(out.get(key, 0), int(offset))
    return out


@contextmanager
def process_group(config: ServiceConfig) -> Iterator[tuple[int, int]]:
    """Join the process group from the launcher's variables; yields (rank, world size)."""
    cuda = config.learner.device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's store outlives a restart: without a per-attempt prefix, the new ranks
        # found the killed rank's gloo address there and hung connecting to it.
        agent = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=COLLECTIVE_TIMEOUT,
        )
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"streamcl/attempt_{restart}", agent),
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=COLLECTIVE_TIMEOUT,
        )
    else:
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    rank, world = dist.get_rank(), dist.get_world_size()
    log.info("rank %d of %d joined the process group backend=%s", rank, world, backend)
    try:
        yield rank, world
    finally:
        dist.destroy_process_group()
