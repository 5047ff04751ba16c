"""Task boundaries from a stream's task ids, robust to partitions read in fetch order."""

from __future__ import annotations

from typing import Any

import numpy as np

from streamcl.ingest.errors import ConfigError
from streamcl.ingest.schema import NO_TASK

DEFAULT_TASK_WINDOW = 10_000
"""Samples a task may be absent and still be current. A consumer reads its partitions in
turns of up to a fetch each (kafka-python: `max_partition_fetch_bytes`, 1 MiB, about
1,300 Fashion-MNIST samples), so with P partitions carrying different tasks a task
returns within about (P - 1) x 1,300 samples: 10,000 covers 8 partitions."""


class TaskFollower:
    """Say which samples start a task: those whose task id was not seen in the last `window`.

    A Kafka consumer interleaves its partitions; when each carries a different task, the
    task id flips at every turn of the fetch order although no task has changed. A
    boundary is therefore a task id *arriving*: new to the last `window` samples (a task
    starting, or returning after a long absence); flips between tasks seen within the
    window are interleaving. On a stream whose tasks follow one another, every change is
    an arrival and falls on the same sample as a plain comparison with the previous id.
    The first task of a stream is no boundary. Samples without a task id only advance
    the clock. State: each recent task's last position, pruned past the window at every
    arrival, so it holds about as many entries as tasks are current at once.
    """

    def __init__(self, window: int = DEFAULT_TASK_WINDOW):
        if window < 1:
            raise ConfigError(f"task_window must be >= 1 sample, got {window}")
        self.window = window
        self._clock = 0
        self._last_seen: dict[int, int] = {}
        self._started = False

    def arrives(self, task: int) -> bool:
        """Observe one sample's task id; True when it is a boundary (a task arriving)."""
        index = self._clock
        self._clock += 1
        if task == NO_TASK:
            return False
        last = self._last_seen.get(task)
        self._last_seen[task] = index
        if last is not None and index - last <= self.window:
            return False
        self._last_seen = {t: i for t, i in self._last_seen.items() if index - i <= self.window}
        started, self._started = self._started, True
        return started

    def arriving(self, tasks: np.ndarray) -> list[int]:
        """Positions in `tasks` `[n]` that are boundaries: `arrives` on each row in order.

        A batch of one task seen within the window (the common case) is decided at once.
        """
        n = len(tasks)
        if n:
            task = int(tasks[0])
            last = self._last_seen.get(task)
            current = task == NO_TASK or (last is not None and self._clock - last <= self.window)
            if current and (tasks == task).all():  # every later row is 1 sample after the last
                if task != NO_TASK:
                    self._last_seen[task] = self._clock + n - 1
                self._clock += n
                return []
        return [i for i, task in enumerate(tasks.tolist()) if self.arrives(task)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "clock": self._clock,
            "last_seen": [[t, i] for t, i in self._last_seen.items()],
            "started": self._started,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._clock = int(state["clock"])
        self._last_seen = {int(t): int(i) for t, i in state["last_seen"]}
        self._started = bool(state["started"])
