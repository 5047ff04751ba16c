"""Logging set-up for the command line: plain text or one JSON object per line.

Messages carry their facts as key=value fields (house style); the JSON format lifts
the single-token ones into fields of their own, so a log pipeline can filter on
`samples_per_second` or `path` without parsing the message.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from datetime import datetime, timezone
from typing import Any, Literal

from streamcl.ingest import strictjson

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
RESERVED = ("time", "level", "logger", "message", "exception")
# A value cut at a space would be wrong: containers ({...}, [...], (...)) are left out.
_FIELD = re.compile(r"(?:^|\s)([A-Za-z_][\w.]*)=([^\s={\[(][^\s=]*)(?=\s|$)")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, key=value fields."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        for key, value in fields(message).items():
            if key not in RESERVED:
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return strictjson.dumps(doc, default=str)


def fields(message: str) -> dict[str, Any]:
    """The single-token key=value pairs of a message, numbers as numbers."""
    out: dict[str, Any] = {}
    for key, raw in _FIELD.findall(message):
        value: Any = raw
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                continue
        if isinstance(value, float) and not math.isfinite(value):
            value = raw  # "nan" stays text: JSON has no NaN
        out[key] = value
    return out


def configure_logging(level: str, log_format: LogFormat) -> None:
    """Send every log record to stderr at `level`, as text or JSON lines.

    Replaces the handler a previous call installed and leaves others alone (a test
    runner's capture, say).
    """
    handler = _Stderr()
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    requested = logging.getLevelName(level.upper())
    for name, least in KAFKA_LOGGERS.items():
        logging.getLogger(name).setLevel(
            requested if requested == logging.DEBUG else max(least, requested)
        )


KAFKA_LOGGERS = {
    # kafka-python's warnings (coordinator lost, commits refused) must reach the operator;
    # its INFO lines narrate the client's event loop.
    "kafka": logging.WARNING,
    # Positions the client moves on its own (offset out of range, reset, truncation) are
    # INFO there and are what an operator needs to see nothing was skipped silently.
    "kafka.consumer.fetcher": logging.INFO,
    # "Task ... ran for 0.4s, blocking the event loop": the learner holding the thread.
    "kafka.net.selector": logging.ERROR,
}
"""Least severe level logged per kafka-python logger (`--log-level DEBUG` shows all)."""


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is at the time (click's test runner swaps it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass
