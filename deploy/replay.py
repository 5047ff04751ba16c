"""`streamcl replay`: run the learner over a recorded stream and report what it learned."""

from __future__ import annotations

import logging
import platform
import time
from collections import Counter
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from deploy.config import ReplayConfig
from deploy.wiring import build_learner, configure_threads
from evaluation.probes import ProbeResult, evaluate
from evaluation.report import metric_section
from evaluation.tracker import AccuracyMatrix, PrequentialAccuracy
from ingest import heldout as heldout_io
from ingest.codec import decode
from ingest.heldout import HeldOut
from ingest.recorded import CorruptFrame, StreamReader
from ingest.schema import NO_TASK, Batch, Origin, Rejected, Sample
from learner.loop import OnlineLearner

log = logging.getLogger(__name__)
DEFAULT_THREADS = 1


class ReplayRun:
    """State of one replay: learner, trackers and the accounting of every message."""

    def __init__(self, config: ReplayConfig, learner: OnlineLearner, heldout: HeldOut | None):
        self.config = config
        self.learner = learner
        self.heldout = heldout
        num_groups = int(heldout.groups.max()) + 1 if heldout is not None else 0
        self.matrix = AccuracyMatrix(num_groups)
        self.prequential = PrequentialAccuracy(config.prequential_window)
        self.rejected: Counter[str] = Counter()
        self.samples_seen = 0
        self.samples_learned = 0
        self.curve: list[dict[str, float]] = []
        self.final_probe: ProbeResult | None = None
        self._pending: list[Sample] = []
        self._current_task = NO_TASK
        self._next_eval = config.eval_every or 0
        self._evaluated_at = -1
        self.evaluation_seconds = 0.0

    def offer(self, sample: Sample) -> None:
        """Queue one valid sample; learn when a batch is full, evaluate at task boundaries."""
        if sample.task != self._current_task and sample.task != NO_TASK:
            if self._current_task != NO_TASK:
                self.flush()
                self.evaluate()
            self._current_task = sample.task
        self._pending.append(sample)
        if len(self._pending) >= self.config.batch_size:
            self.flush()

    def reject(self, reason: str) -> None:
        self.rejected[reason] += 1

    def flush(self) -> None:
        if not self._pending:
            return
        batch = Batch.from_samples(self._pending)
        self._pending = []
        result = self.learner.learn(batch)
        self.prequential.update(result.predictions == batch.labels)
        self.samples_learned += len(batch)
        if self.heldout is not None:
            kind_is_task = self.heldout.group_kind == "task"
            groups = batch.tasks if kind_is_task else batch.labels
            self.matrix.observe(groups[groups >= 0])
        if self._next_eval and self.samples_learned >= self._next_eval:
            self.evaluate()
            while self._next_eval <= self.samples_learned:
                self._next_eval += self.config.eval_every or 0

    def evaluate(self) -> None:
        """Score every group's probe now: one row of the accuracy matrix."""
        if self.heldout is None or self._evaluated_at == self.samples_learned:
            return
        h = self.heldout
        started = time.perf_counter()
        self.final_probe = evaluate(
            self.learner.predict,
            h.features,
            h.labels,
            h.groups,
            self.matrix.num_groups,
            self.learner.spec.num_classes,
        )
        summary = self.matrix.update(self.final_probe.per_group, self.samples_learned)
        self._evaluated_at = self.samples_learned
        self.evaluation_seconds += time.perf_counter() - started
        self.curve.append(
            {
                "samples_seen": self.samples_learned,
                "average_accuracy": summary.average_accuracy,
                "average_forgetting": summary.average_forgetting,
                "prequential_window": self.prequential.get_windowed(),
            }
        )
        log.info(
            "evaluated samples=%d average_accuracy=%.4f forgetting=%.4f",
            self.samples_learned,
            summary.average_accuracy,
            summary.average_forgetting,
        )


def run_replay(config: ReplayConfig, progress: bool | None = None) -> dict[str, Any]:
    """Replay `config.stream` through a fresh learner; returns the report dict."""
    threads = configure_threads(config.threads or DEFAULT_THREADS)
    started = time.perf_counter()
    with StreamReader(config.stream) as reader:
        heldout = _load_heldout(config)
        learner = build_learner(config, reader.spec)
        run = ReplayRun(config, learner, heldout)
        total = reader.header.get("num_messages")
        bar = tqdm(
            reader,
            total=total,
            unit="msg",
            desc="replay",
            disable=None if progress is None else not progress,
        )
        corrupt = 0
        topic = str(config.stream)
        learn_started = time.perf_counter()
        for item in bar:
            if isinstance(item, CorruptFrame):
                corrupt += 1
                log.warning(
                    "corrupt frame skipped position=%d detail=%s", item.position, item.detail
                )
                continue
            run.samples_seen += 1
            decoded = decode(item.payload, reader.spec, Origin(topic, 0, item.offset))
            if isinstance(decoded, Rejected):
                run.reject(decoded.reason)
            else:
                run.offer(decoded)
        run.flush()
        run.evaluate()
        # Probe evaluation is reported on its own; throughput counts the streaming work.
        learn_seconds = time.perf_counter() - learn_started - run.evaluation_seconds
    wall = time.perf_counter() - started
    if corrupt:
        run.rejected["corrupt_frame"] += corrupt
    report = {
        **metric_section(
            run.matrix,
            run.prequential,
            run.final_probe,
            heldout.group_kind if heldout else "none",
            run.curve,
        ),
        "samples_seen": run.samples_seen,
        "samples_learned": run.samples_learned,
        "samples_rejected": sum(run.rejected.values()) - corrupt,
        "samples_quarantined": 0,
        "corrupt_frames": corrupt,
        "rejected_by_reason": dict(sorted(run.rejected.items())),
        "updates": learner.updates,
        "samples_per_second": run.samples_learned / learn_seconds if learn_seconds else 0.0,
        "evaluation_seconds": run.evaluation_seconds,
        "wall_seconds": wall,
        # Enough to reproduce the run; where its outputs went is not part of it.
        "config": config.model_dump(mode="json", exclude={"report", "plots"}),
        "environment": {
            "device": str(learner.device),
            "threads": threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    return report


def _load_heldout(config: ReplayConfig) -> HeldOut | None:
    path = config.heldout or heldout_io.sidecar_path(config.stream)
    if config.heldout is None and not path.exists():
        log.warning("no held-out set at %s: only prequential accuracy will be reported", path)
        return None
    return heldout_io.load(path)


TIMING_KEYS = ("samples_per_second", "evaluation_seconds", "wall_seconds")


def without_timings(report: dict[str, Any]) -> dict[str, Any]:
    """The report minus the keys that vary between identical runs."""
    return {k: v for k, v in report.items() if k not in TIMING_KEYS}


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A short human-readable summary for the terminal."""
    lines = [
        f"final average accuracy  {report['final_average_accuracy']:.4f}",
        f"average forgetting      {report['average_forgetting']:.4f}",
        f"backward transfer       {report['backward_transfer']:+.4f}",
        f"prequential accuracy    {report['prequential_accuracy']:.4f}",
        f"samples seen/learned    {report['samples_seen']} / {report['samples_learned']}",
        f"rejected                {report['samples_rejected']} "
        f"{report['rejected_by_reason'] or ''}".rstrip(),
        f"quarantined             {report['samples_quarantined']}",
        f"throughput              {report['samples_per_second']:.0f} samples/s "
        f"({report['environment']['threads']} thread(s), {report['environment']['device']})",
    ]
    matrix = np.array(report["accuracy_matrix"], dtype=float)
    if matrix.size:
        lines.append("accuracy matrix (rows: evaluation points, columns: groups)")
        lines += ["  " + " ".join(f"{v:.3f}" for v in row) for row in matrix]
    return lines
