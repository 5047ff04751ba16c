"""A real Prometheus server on loopback for integration tests (Debian package `prometheus`).

`PrometheusServer` writes its own config (1 s scrape and rule evaluation), keeps its
TSDB in a temporary directory and listens on a free loopback port; `query` goes
through the HTTP API. Tests that need it call `require_prometheus()` first: without
the binary they skip, unless STREAMCL_REQUIRE_PROMETHEUS=1 (CI) makes that a failure.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import yaml

from streamcl.deploy.devbroker.tansu import free_port

PROMETHEUS = Path("/usr/bin/prometheus")
REPO = Path(__file__).parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "streamcl-dashboard.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
# Grafana's built-in variables, replaced by the values a 1 s scrape interval supports.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5s",
    "$__interval": "5s",
    "$__range": "1m",
}

Result = list[dict[str, Any]]
# No proxy for loopback, whatever the environment says.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PrometheusError(RuntimeError):
    """Prometheus would not start, or answered a request with an error."""


def require_prometheus() -> Path:
    """The Prometheus binary; skip the test without it (fail with STREAMCL_REQUIRE_PROMETHEUS=1)."""
    if PROMETHEUS.is_file() and os.access(PROMETHEUS, os.X_OK):
        return PROMETHEUS
    message = f"{PROMETHEUS} not installed (Debian package prometheus)"
    if os.environ.get("STREAMCL_REQUIRE_PROMETHEUS") == "1":
        pytest.fail(f"STREAMCL_REQUIRE_PROMETHEUS=1 but {message}")
    pytest.skip(message)


def nonempty(result: Result) -> bool:
    return bool(result)


def finite_values(result: Result) -> bool:
    """True when `result` (an instant vector) has samples and all of them are finite."""
    return bool(result) and all(math.isfinite(float(s["value"][1])) for s in result)


def render_grafana_expr(expr: str, instance: str = ".+") -> str:
    """Replace a dashboard expression's Grafana variables with values Prometheus accepts."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr.replace("$instance", instance)


def dashboard_exprs(dashboard: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and annotation query of the dashboard."""
    if dashboard is None:
        dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        (f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"])
        for p in dashboard["panels"]
        for t in p.get("targets", [])
    ]
    exprs += [
        (f"annotation {a['name']!r}", a["expr"])
        for a in dashboard["annotations"]["list"]
        if "expr" in a
    ]
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of deploy/prometheus/alerts.yml."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


class PrometheusServer:
    """Run /usr/bin/prometheus scraping `targets` (host:port on loopback) every second.

    Use as a context manager; `rule_files` are absolute paths of rule files to load.
    """

    def __init__(
        self,
        targets: Sequence[str],
        rule_files: Sequence[str | Path] = (),
        job: str = "streamcl",
        metrics_path: str = "/metrics",
        start_timeout_s: float = 30.0,
    ):
        if not targets:
            raise ValueError("PrometheusServer needs at least one scrape target")
        for target in targets:
            host = target.rsplit(":", 1)[0]
            if host not in LOOPBACK_HOSTS:
                raise ValueError(f"scrape target must be host:port on loopback, got {target!r}")
        for path in rule_files:
            if not Path(path).is_absolute():
                raise ValueError(f"rule file paths must be absolute, got {path!r}")
        self.scrape_targets = list(targets)
        self.rule_files = [str(p) for p in rule_files]
        self.job = job
        self.metrics_path = metrics_path
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start Prometheus and wait until /-/ready answers; retry on a port taken meanwhile."""
        binary = require_prometheus()
        self._dir = Path(tempfile.mkdtemp(prefix="streamcl-prometheus-"))
        config = self._dir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self._config(), sort_keys=False))
        for _attempt in range(3):
            self.port = free_port()
            log = open(self._dir / "prometheus.log", "wb")  # noqa: SIM115 - the child holds it
            self._process = subprocess.Popen(
                [
                    str(binary),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self._dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            if self._wait_ready():
                return
            if "address already in use" not in self.log_text():
                break
        output = self.log_text()
        self.stop()
        raise PrometheusError(f"Prometheus did not become ready; its log:\n{output[-4000:]}")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def log_text(self) -> str:
        """What Prometheus wrote to stdout/stderr so far (for failure messages)."""
        if self._dir is None or not (self._dir / "prometheus.log").exists():
            return ""
        return (self._dir / "prometheus.log").read_text(errors="replace")

    def query(self, expr: str) -> Result:
        """Evaluate `expr` now; the API's `result` list (instant vector samples)."""
        data = self._get("/api/v1/query", {"query": expr}, what=f"query {expr!r}")
        result = data["result"]
        # Scalars and strings come back as one [time, value] pair: wrap like a sample.
        return result if isinstance(result, list) else [{"metric": {}, "value": result}]

    def wait_for(
        self,
        expr: str,
        timeout_s: float = 10.0,
        predicate: Callable[[Result], bool] = nonempty,
        interval_s: float = 0.2,
    ) -> Result:
        """Poll `expr` until `predicate(result)` holds; the result, or TimeoutError."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{expr!r} did not satisfy {getattr(predicate, '__name__', predicate)} "
                    f"within {timeout_s} s; last result: {result}"
                )
            time.sleep(interval_s)

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets, as /api/v1/targets reports them."""
        return list(self._get("/api/v1/targets", {}, what="targets")["activeTargets"])

    def targets_up(self) -> bool:
        """True when every configured target has been scraped successfully (health up)."""
        active = self.targets()
        return len(active) == len(self.scrape_targets) and all(t["health"] == "up" for t in active)

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule with its state, health and last error (/api/v1/rules)."""
        groups = self._get("/api/v1/rules", {}, what="rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",  # must not exceed the interval (default 10 s)
                "evaluation_interval": "1s",
            },
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "metrics_path": self.metrics_path,
                    "static_configs": [{"targets": self.scrape_targets}],
                }
            ],
        }
        if self.rule_files:
            config["rule_files"] = self.rule_files
        return config

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            try:
                with _opener.open(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        return False

    def _get(self, path: str, params: dict[str, str], what: str) -> Any:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with _opener.open(url, timeout=10) as response:
                body = response.read()
        except urllib.error.HTTPError as err:
            # Bad queries answer 400/422 with the same JSON envelope; read its error.
            body = err.read()
        except (urllib.error.URLError, OSError) as err:
            raise PrometheusError(f"{what}: cannot reach Prometheus at {self.url}: {err}") from err
        try:
            doc = json.loads(body)
        except ValueError as err:
            raise PrometheusError(f"{what}: Prometheus answered non-JSON: {body[:200]!r}") from err
        if doc.get("status") != "success":
            raise PrometheusError(
                f"{what} failed: {doc.get('errorType', 'error')}: {doc.get('error', doc)}"
            )
        return doc["data"]
