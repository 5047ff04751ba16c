"""Backoff between retries of a failing checkpoint, and the bounded log it writes."""

from __future__ import annotations

import logging

import pytest

from streamcl.deploy.runtime.retry import Backoff


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def backoff(clock: Clock) -> Backoff:
    return Backoff("checkpoint", logging.getLogger("test.retry"), 1.0, 8.0, 60.0, clock)


def test_delays_double_up_to_the_ceiling_and_reset_on_success() -> None:
    clock = Clock()
    b = backoff(clock)
    assert b.ready() and not b.failing
    delays = []
    for _ in range(6):
        b.failed("error=x")
        delays.append(b.retry_at - clock.now)
        assert not b.ready()
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    clock.now += 7.9
    assert not b.ready()
    clock.now += 0.1
    assert b.ready()
    b.succeeded()
    assert not b.failing and b.ready() and b.delay() == 0.0
    b.failed("error=x")
    assert b.retry_at - clock.now == 1.0


def test_first_failure_is_logged_then_one_summary_a_minute_then_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    b = backoff(clock)
    caplog.set_level(logging.INFO, logger="test.retry")
    for _ in range(100):  # 100 failures 1 s apart: 100 s
        b.failed("dir=/c error=OSError: [Errno 28] No space left on device")
        clock.now += 1.0
    b.succeeded()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == ["ERROR", "ERROR", "WARNING"]
    assert lines[0][1].startswith("checkpoint failed, retrying with backoff (next in 1.0 s")
    assert "No space left on device" in lines[0][1]
    assert "checkpoint still failing failures=61 since_seconds=60 " in lines[1][1]
    assert "failures_since_last_line=60 " in lines[1][1]
    assert lines[2][1] == "checkpoint works again after failures=100 seconds=100.0"


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="min_seconds <= max_seconds"):
        Backoff("x", logging.getLogger("x"), 2.0, 1.0)
