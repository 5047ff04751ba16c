"""A bounded quarantine for suspect arrivals: held, re-examined later, never silently lost.

A suspect sample waits until `recheck_after` more samples have arrived, then the model,
having learned more, re-examines it: when it now predicts the sample's label, the
sample is re-admitted (learned, and may enter memory); otherwise it waits again, and
after `max_checks` failed examinations it is finally rejected as noisy. When the
quarantine is over `capacity`, its oldest samples are examined at once and rejected
if they fail. Every sample is in exactly one place: learned, in quarantine or rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from streamcl.ingest.errors import ConfigError
from streamcl.ingest.schema import Batch, Origin, Sample


@dataclass
class Held:
    sample: Sample
    reason: str
    since: int  # stream sample count when it entered (or last failed a check)
    checks: int = 0


@dataclass(frozen=True)
class Examination:
    """What a re-examination decided: samples re-admitted and finally rejected (with reasons)."""

    readmitted: list[Sample]
    rejected: list[Held]


class Quarantine:
    """FIFO of suspect samples with their reason, age and number of failed checks."""

    def __init__(self, capacity: int = 1000, recheck_after: int = 1000, max_checks: int = 2):
        if capacity < 0 or recheck_after < 0 or max_checks < 1:
            raise ConfigError(
                "quarantine needs capacity >= 0, recheck_after >= 0, max_checks >= 1; got "
                f"{capacity}, {recheck_after}, {max_checks}"
            )
        self.capacity = capacity
        self.recheck_after = recheck_after
        self.max_checks = max_checks
        self.held: list[Held] = []

    def __len__(self) -> int:
        return len(self.held)

    def add(self, batch: Batch, rows: np.ndarray, reasons: list[str], now: int) -> None:
        """Hold `batch`'s `rows` (stream count `now`), `reasons[i]` for row `rows[i]`."""
        for row, reason in zip(rows.tolist(), reasons, strict=True):
            sample = Sample(
                batch.features[row].copy(),
                int(batch.labels[row]),
                int(batch.tasks[row]),
                int(batch.sample_ids[row]),
                int(batch.event_times_ms[row]),
                batch.origins[row] if batch.origins else None,
            )
            self.held.append(Held(sample, reason, now))

    def due(self, now: int) -> list[Held]:
        """Remove and return the samples to examine now: aged ones and any over capacity.

        `held` stays ordered by `since` (entries and re-holds are appended with the
        current count), so both are a prefix.
        """
        over = max(0, len(self.held) - self.capacity)
        end = over
        while end < len(self.held) and now - self.held[end].since >= self.recheck_after:
            end += 1
        taken, self.held = self.held[:end], self.held[end:]
        # Over-capacity samples get one last check: failing it rejects them.
        for h in taken[:over]:
            h.checks = self.max_checks - 1
        return taken

    def settle(self, examined: list[Held], passed: np.ndarray, now: int) -> Examination:
        """Apply the model's verdicts `[n]` bool to `examined`: re-admit, re-hold or reject."""
        readmitted, rejected = [], []
        for held, ok in zip(examined, passed.tolist(), strict=True):
            if ok:
                readmitted.append(held.sample)
                continue
            held.checks += 1
            if held.checks >= self.max_checks:
                rejected.append(held)
            else:
                held.since = now
                self.held.append(held)
        return Examination(readmitted, rejected)

    def sample_ids(self) -> np.ndarray:
        return np.fromiter((h.sample.sample_id for h in self.held), np.int64, len(self.held))

    def state_dict(self) -> dict[str, Any]:
        if not self.held:
            return {"count": 0}
        samples = [h.sample for h in self.held]
        return {
            "count": len(samples),
            "features": torch.from_numpy(np.stack([s.features for s in samples])),
            "columns": torch.tensor(
                [[s.label, s.task, s.sample_id, s.event_time_ms] for s in samples],
                dtype=torch.int64,
            ),
            "since_checks": torch.tensor([[h.since, h.checks] for h in self.held]),
            "reasons": [h.reason for h in self.held],
            "origins": [
                [o.topic, o.partition, o.offset] if o else None for o in (s.origin for s in samples)
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.held = []
        for i in range(int(state["count"])):
            label, task, sample_id, event_time = state["columns"][i].tolist()
            origin = state["origins"][i]
            sample = Sample(
                state["features"][i].numpy(),
                label,
                task,
                sample_id,
                event_time,
                Origin(*origin) if origin else None,
            )
            since, checks = state["since_checks"][i].tolist()
            self.held.append(Held(sample, state["reasons"][i], since, checks))
