"""HTTP endpoints of the service: /healthz, /readyz, /metrics, /predict (stdlib server)."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from deploy.service import Service

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 16 * 1024 * 1024


class ServiceHttp:
    """Serve the endpoints for `service` on host:port until `close`."""

    def __init__(self, service: Service, host: str, port: int, stall_seconds: float):
        handler = type("Handler", (_Handler,), {"service": service, "stall_seconds": stall_seconds})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self.thread.start()
        log.info("http listening address=%s:%d", *self.address)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    service: Service
    stall_seconds: float

    def do_GET(self) -> None:
        if self.path == "/healthz":
            stalled = time.monotonic() - self.service.last_progress
            ok = stalled < self.stall_seconds
            self._send(
                200 if ok else 503,
                {"status": "ok" if ok else "stalled", "seconds_since_progress": round(stalled, 3)},
            )
        elif self.path == "/metrics":
            body = generate_latest(self.service.metrics.registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/readyz":
            partitions = self.service.source.assignment() if self.service.ready else []
            ready = self.service.ready and bool(partitions)
            self._send(
                200 if ready else 503,
                {
                    "ready": ready,
                    "partitions": partitions,
                    "model_version": self.service.learner.updates,
                },
            )
        else:
            self._send(404, {"error": f"no such endpoint {self.path}"})

    def do_POST(self) -> None:
        if self.path != "/predict":
            self._send(404, {"error": f"no such endpoint {self.path}"})
            return
        try:
            features = self._features()
        except ValueError as err:
            self._send(400, {"error": str(err)})
            return
        probabilities, version = self.service.predict_proba(features)
        self._send(
            200,
            {
                "probabilities": probabilities.tolist(),
                "predictions": probabilities.argmax(axis=1).tolist(),
                "model_version": version,
            },
        )

    def _features(self) -> np.ndarray:
        """Parse `{"features": sample}` or `{"instances": [sample, ...]}` into `[N, *shape]`."""
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY_BYTES:
            raise ValueError(f"body must be 1..{MAX_BODY_BYTES} bytes of JSON, got {length}")
        try:
            doc = json.loads(self.rfile.read(length))
        except ValueError as err:
            raise ValueError(f"body is not JSON: {err}") from err
        if not isinstance(doc, dict) or not ("features" in doc or "instances" in doc):
            raise ValueError('expected {"features": [...]} or {"instances": [[...], ...]}')
        spec = self.service.spec
        rows = [doc["features"]] if "features" in doc else doc["instances"]
        try:
            array = np.asarray(rows, dtype=np.float64).reshape((len(rows), *spec.feature_shape))
        except (TypeError, ValueError) as err:
            raise ValueError(f"each sample must have shape {spec.feature_shape}: {err}") from err
        if not np.isfinite(array).all():
            raise ValueError("features contain NaN or infinity")
        if spec.dtype == "uint8" and ((array < 0) | (array > 255)).any():
            raise ValueError("uint8 features must be in [0, 255]")
        return array.astype(spec.dtype)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http " + format, *args)
