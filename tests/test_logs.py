"""JSON log lines: key=value facts of a message become typed fields."""

from __future__ import annotations

import json
import logging

from deploy.logs import JsonFormatter, fields


def test_single_token_fields_are_lifted_and_typed() -> None:
    message = "checkpoint path=/c/checkpoint-1.pt updates=5 offsets={('t', 0): 5} seconds=0.013"
    assert fields(message) == {"path": "/c/checkpoint-1.pt", "updates": 5, "seconds": 0.013}
    assert fields("progress average_accuracy=n/a lag=0") == {"average_accuracy": "n/a", "lag": 0}
    assert fields("listening on http://127.0.0.1:8080") == {}


def test_a_record_is_one_json_object_and_fields_never_replace_the_core_keys() -> None:
    record = logging.LogRecord(
        "deploy.service", logging.INFO, __file__, 1, "x level=9 learned=%d", (12,), None
    )
    doc = json.loads(JsonFormatter().format(record))
    assert doc["level"] == "INFO" and doc["logger"] == "deploy.service"
    assert doc["message"] == "x level=9 learned=12"
    assert doc["learned"] == 12
    assert doc["time"].endswith("+00:00")
