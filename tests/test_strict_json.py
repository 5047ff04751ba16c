"""Every JSON streamcl writes parses with a strict parser: no NaN or Infinity literals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamcl.deploy.cli.logs import fields
from streamcl.deploy.devbroker.tansu import EmbeddedBroker
from streamcl.deploy.runtime.serve import run_service
from streamcl.evaluation.report import metric_section
from streamcl.evaluation.tracker import AccuracyMatrix, PrequentialAccuracy
from streamcl.ingest import strictjson
from tests.brokers import memory_broker, unique_topic  # noqa: F401
from tests.service_helpers import (
    PLAIN_LEARNER,
    UNTIL_IDLE,
    digit_payloads,
    produce,
    service_config,
)


def reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def strict_loads(text: str) -> Any:
    """What JavaScript's JSON.parse (and Go, Rust, Java parsers) accept."""
    return json.loads(text, parse_constant=reject_constant)


def test_a_group_without_probe_samples_gives_null_metrics_with_a_reason() -> None:
    matrix = AccuracyMatrix(3)
    matrix.observe(np.array([0, 2]))
    matrix.update(np.array([0.5, np.nan, np.nan]), samples_seen=10)  # class 2: no probe
    section = metric_section(matrix, PrequentialAccuracy(), None, "class", [])
    text = strictjson.dumps(section)
    parsed = strict_loads(text)
    assert parsed["final_average_accuracy"] is None
    assert (
        "class 2 trained on but without a probe sample"
        in (parsed["null_reasons"]["final_average_accuracy"])
    )
    assert parsed["accuracy_matrix"] == [[0.5, None, None]]
    with pytest.raises(ValueError, match="NaN"):
        strict_loads(json.dumps({"x": float("nan")}))  # the check itself can fail


def test_strictjson_replaces_every_non_finite_value() -> None:
    value = {"a": [float("inf"), np.float32("nan"), 1.5], "b": (np.int64(3), -np.inf)}
    assert strict_loads(strictjson.dumps(value)) == {"a": [None, None, 1.5], "b": [3, None]}


def test_json_log_fields_keep_nan_as_text() -> None:
    assert fields("progress learned=3 average_accuracy=nan rate=inf ok=0.5") == {
        "learned": 3,
        "average_accuracy": "nan",
        "rate": "inf",
        "ok": 0.5,
    }


def test_the_service_report_and_snapshot_meta_parse_strictly_on_a_short_stream(
    memory_broker: EmbeddedBroker,  # noqa: F811
    tmp_path: Path,
) -> None:
    topic = unique_topic("strict")
    memory_broker.create_topic(topic)
    produce(memory_broker, topic, digit_payloads(40))
    report_path = tmp_path / "report.json"
    config = service_config(
        memory_broker,
        topic,
        tmp_path,
        until_idle=UNTIL_IDLE,
        learner=PLAIN_LEARNER,
        probe={"fraction": 0.1},  # 40 samples, 10 classes: some class gets no probe sample
        report=str(report_path),
        snapshot={"every_updates": 1},
    )
    in_memory = run_service(config)
    report = strict_loads(report_path.read_text())
    assert in_memory["final_average_accuracy"] is None  # measured: seed 0 leaves classes unprobed
    assert report["final_average_accuracy"] is None
    assert "without a probe sample" in report["null_reasons"]["final_average_accuracy"]
    metas = sorted((tmp_path / "snapshots").glob("*/meta.json"))
    assert metas
    for meta in metas:
        strict_loads(meta.read_text())
