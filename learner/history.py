"""A bounded record of events (task boundaries, detector events) for weeks-long runs."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Iterator
from typing import Any, Generic, Protocol, TypeVar

RECENT_EVENTS = 200
"""Events kept in full besides the counts: reports list the latest, checkpoints hold no more."""


class Reasoned(Protocol):
    @property
    def reason(self) -> str: ...


E = TypeVar("E", bound=Reasoned)


class EventLog(Generic[E]):
    """Count every event by reason; keep only the latest `keep` events themselves.

    A service finds boundaries for as long as it runs; what its report and metrics need
    is how many of each reason there were and where the latest ones fell, so the log's
    size (and the checkpoint's) does not grow with the run's age. Iteration yields the
    kept events, oldest first.
    """

    def __init__(self, keep: int = RECENT_EVENTS):
        if keep < 1:
            raise ValueError(f"keep must be >= 1 event, got {keep}")
        self.recent: deque[E] = deque(maxlen=keep)
        self.by_reason: Counter[str] = Counter()

    @property
    def total(self) -> int:
        """Every event ever appended, kept or not."""
        return sum(self.by_reason.values())

    def append(self, event: E) -> None:
        self.recent.append(event)
        self.by_reason[event.reason] += 1

    def __iter__(self) -> Iterator[E]:
        return iter(self.recent)

    def state_dict(self) -> dict[str, Any]:
        """The counts; the owner saves the kept events in its own encoding."""
        return {"by_reason": dict(sorted(self.by_reason.items()))}

    def load_state_dict(self, state: dict[str, Any], recent: Iterable[E]) -> None:
        self.by_reason = Counter({str(k): int(v) for k, v in state["by_reason"].items()})
        self.recent.clear()
        self.recent.extend(recent)
