"""`replay --metrics-out` / `--pushgateway`, and the exporter's exposition format."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamcl.deploy.cli.main import cli
from streamcl.deploy.runtime.metrics import OUTCOMES, ServiceMetrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_replay_writes_final_metrics_in_text_format(digits_stream: Path, tmp_path: Path) -> None:
    out = tmp_path / "replay.prom"
    report_path = tmp_path / "r.json"
    result = CliRunner().invoke(
        cli,
        [
            "replay",
            "--stream",
            str(digits_stream),
            "--no-progress",
            "--report",
            str(report_path),
            "--metrics-out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    values = samples(out.read_text())
    outcomes = [values[("streamcl_samples_total", (("outcome", o),))] for o in OUTCOMES]
    assert sum(outcomes) == 1348  # learned or quarantined on arrival (no invalid message)
    assert (
        values[("streamcl_samples_total", (("outcome", "learned"),))] == report["samples_admitted"]
    )
    assert values[("streamcl_average_accuracy_ratio", ())] == pytest.approx(
        report["final_average_accuracy"]
    )
    assert values[("streamcl_average_forgetting_ratio", ())] == pytest.approx(
        report["average_forgetting"]
    )
    assert values[("streamcl_group_accuracy_ratio", (("group", "4"),))] == pytest.approx(
        report["accuracy_matrix"][-1][4]
    )
    memory = report["memory"]  # the default memory indexes pooled inputs for the kNN filter
    assert memory["backend"] == "faiss-cpu-flat"
    assert values[("streamcl_memory_index_info", (("backend", "faiss-cpu-flat"),))] == 1
    assert memory["bytes"]["features"] > 0 and memory["bytes"]["index"] > 0
    for part, size in memory["bytes"].items():
        assert values[("streamcl_memory_part_bytes", (("part", part),))] == size
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=out.read_bytes(), capture_output=True, check=False
    )
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr


def test_exporter_passes_promtool_lint() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    metrics = ServiceMetrics(CollectorRegistry())
    metrics.lag.labels("0").set(5)
    metrics.set_groups([0.5, 0.25], [None, 0.1])
    check = subprocess.run(
        [promtool, "check", "metrics"],
        input=generate_latest(metrics.registry),
        capture_output=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == b"" and check.stderr.strip() == b""


def test_replay_pushes_to_a_pushgateway_compatible_endpoint(
    digits_stream: Path, tmp_path: Path
) -> None:
    received: list[tuple[str, str, bytes]] = []

    class Gateway(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.command, self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Gateway)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    result = CliRunner().invoke(
        cli, ["replay", "--stream", str(digits_stream), "--no-progress", "--pushgateway", url]
    )
    thread.join(10)
    server.server_close()
    assert result.exit_code == 0, result.output
    [(method, path, body)] = received
    assert (method, path) == ("PUT", "/metrics/job/streamcl_replay")
    pushed = samples(body.decode())
    assert sum(pushed[("streamcl_samples_total", (("outcome", o),))] for o in OUTCOMES) == 1348


def test_every_rank_exports_its_rank_and_only_rank_0_the_global_accuracy() -> None:
    exported = []
    for rank in range(2):
        metrics = ServiceMetrics(CollectorRegistry(), rank=rank, world_size=2)
        metrics.average_accuracy.set(0.5)  # every rank may evaluate; one exports it
        metrics.set_groups([0.5], [0.1])
        metrics.step_seconds.inc(1.0)
        exported.append(samples(generate_latest(metrics.registry).decode()))
    for rank, series in enumerate(exported):
        info = {labels for name, labels in series if name == "streamcl_rank_info"}
        assert info == {
            (("rank", str(rank)), ("world_size", "2")),
        }
        assert series[("streamcl_step_seconds_total", ())] == 1.0
        assert series[("streamcl_communication_seconds_total", ())] == 0.0
    global_only = {
        "streamcl_average_accuracy_ratio",
        "streamcl_average_forgetting_ratio",
        "streamcl_backward_transfer_ratio",
        "streamcl_group_accuracy_ratio",
        "streamcl_group_forgetting_ratio",
    }
    assert global_only <= {name for name, _ in exported[0]}
    assert global_only.isdisjoint(name for name, _ in exported[1])
    # Per-rank series stay on every rank.
    assert ("streamcl_prequential_accuracy_ratio", ()) in exported[1]
