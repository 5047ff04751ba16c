"""JSON log lines: key=value facts of a message become typed fields."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from streamcl.deploy.cli.logs import JsonFormatter, configure_logging, fields


def test_single_token_fields_are_lifted_and_typed() -> None:
    message = "checkpoint path=/c/checkpoint-1.pt updates=5 offsets={('t', 0): 5} seconds=0.013"
    assert fields(message) == {"path": "/c/checkpoint-1.pt", "updates": 5, "seconds": 0.013}
    assert fields("progress average_accuracy=n/a lag=0") == {"average_accuracy": "n/a", "lag": 0}
    assert fields("listening on http://127.0.0.1:8080") == {}


def test_a_record_is_one_json_object_and_fields_never_replace_the_core_keys() -> None:
    record = logging.LogRecord(
        "streamcl.deploy.runtime.service",
        logging.INFO,
        __file__,
        1,
        "x level=9 learned=%d",
        (12,),
        None,
    )
    doc = json.loads(JsonFormatter().format(record))
    assert doc["level"] == "INFO" and doc["logger"] == "streamcl.deploy.runtime.service"
    assert doc["message"] == "x level=9 learned=12"
    assert doc["learned"] == 12
    assert doc["time"].endswith("+00:00")


def test_the_cli_logs_to_the_current_stderr_and_keeps_other_handlers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Logging set up twice (click's runner swaps stderr) writes to the live stream only."""
    root = logging.getLogger()
    level = root.level
    configure_logging("INFO", "text")
    configure_logging("INFO", "json")
    ours = [h for h in root.handlers if type(h).__name__ == "_Stderr"]
    assert len(ours) == 1
    assert caplog.handler in root.handlers
    swapped = io.StringIO()
    real = sys.stderr
    sys.stderr = swapped
    try:
        logging.getLogger("deploy.test").info("hello answer=%d", 42)
    finally:
        sys.stderr = real
        root.removeHandler(ours[0])
        root.setLevel(level)
    assert json.loads(swapped.getvalue())["answer"] == 42
    assert "hello answer=42" in caplog.text


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        (
            "INFO",
            {"kafka": "WARNING", "kafka.consumer.fetcher": "INFO", "kafka.net.selector": "ERROR"},
        ),
        ("WARNING", {"kafka": "WARNING", "kafka.consumer.fetcher": "WARNING"}),
        (
            "DEBUG",
            {"kafka": "DEBUG", "kafka.consumer.fetcher": "DEBUG", "kafka.net.selector": "DEBUG"},
        ),
    ],
)
def test_kafka_python_warnings_and_position_resets_reach_the_operator(
    level: str, expected: dict[str, str]
) -> None:
    """Its WARNINGs (and the fetcher's 'offset out of range' INFO) pass; its loop chatter not."""
    root = logging.getLogger()
    previous = root.level
    try:
        configure_logging(level, "text")
        got = {name: logging.getLevelName(logging.getLogger(name).level) for name in expected}
    finally:
        for handler in [h for h in root.handlers if type(h).__name__ == "_Stderr"]:
            root.removeHandler(handler)
        root.setLevel(previous)
        for name in ("kafka", "kafka.consumer.fetcher", "kafka.net.selector"):
            logging.getLogger(name).setLevel(logging.NOTSET)
    assert got == expected
