"""Retrying a failing periodic operation (the checkpoint) without a busy loop or a log storm.

A full disk used to make every update retry the checkpoint and log an ERROR line:
thousands a second. Here a failure schedules the next try after a delay that doubles
up to a ceiling, the first failure is logged at once, and while it keeps failing one
summary line is logged at most every `summary_seconds`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

SUMMARY_SECONDS = 60.0
"""At most one 'still failing' line per this many seconds, whatever the retry rate."""


class Backoff:
    """When a failing operation may be tried again, and what to log about it.

    `clock` is injected (seconds, monotonic) so tests can drive time.
    """

    def __init__(
        self,
        what: str,
        logger: logging.Logger,
        min_seconds: float,
        max_seconds: float,
        summary_seconds: float = SUMMARY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not 0 < min_seconds <= max_seconds:
            raise ValueError(
                f"need 0 < min_seconds <= max_seconds, got {min_seconds} and {max_seconds}"
            )
        self.what = what
        self.log = logger
        self.min_seconds = min_seconds
        self.max_seconds = max_seconds
        self.summary_seconds = summary_seconds
        self.clock = clock
        self.failures = 0  # consecutive, since the last success
        self.retry_at = 0.0
        self._first_failure_at = 0.0
        self._summary_at = 0.0
        self._since_summary = 0

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def ready(self) -> bool:
        """Whether the operation may run now (always, unless it is backing off)."""
        return self.clock() >= self.retry_at

    def delay(self) -> float:
        """Seconds to wait after the current run of failures (0 when not failing)."""
        if not self.failures:
            return 0.0
        return min(self.max_seconds, self.min_seconds * 2.0 ** (self.failures - 1))

    def failed(self, detail: str) -> None:
        """Count a failure, schedule the next try, log the first one or a periodic summary."""
        now = self.clock()
        self.failures += 1
        self._since_summary += 1
        self.retry_at = now + self.delay()
        if self.failures == 1:
            self._first_failure_at = self._summary_at = now
            self._since_summary = 0
            self.log.error(
                "%s failed, retrying with backoff (next in %.1f s, at most every %.0f s) %s",
                self.what,
                self.delay(),
                self.max_seconds,
                detail,
            )
        elif now - self._summary_at >= self.summary_seconds:
            self.log.error(
                "%s still failing failures=%d since_seconds=%.0f failures_since_last_line=%d "
                "next_retry_seconds=%.1f %s",
                self.what,
                self.failures,
                now - self._first_failure_at,
                self._since_summary,
                self.delay(),
                detail,
            )
            self._summary_at = now
            self._since_summary = 0

    def succeeded(self) -> None:
        """Reset; after a run of failures, say that it works again."""
        if self.failures:
            self.log.warning(
                "%s works again after failures=%d seconds=%.1f",
                self.what,
                self.failures,
                self.clock() - self._first_failure_at,
            )
        self.failures = 0
        self.retry_at = 0.0
