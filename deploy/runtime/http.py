"""HTTP endpoints of the service: /healthz, /readyz, /metrics, /predict (stdlib server).

Concurrency is bounded: a fixed pool of worker threads, a bounded wait queue behind it
and a listen backlog sized for bursts. A /predict that finds every worker and queue slot
taken is answered 503 with Retry-After by a small, bounded set of rejecting threads,
rather than left in an overflowing accept queue where clients hang for a minute;
health, readiness and metrics are answered there in full.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from streamcl.deploy.runtime.config import HttpConfig
from streamcl.ingest import strictjson

if TYPE_CHECKING:
    from streamcl.deploy.runtime.service import Service

log = logging.getLogger(__name__)
REQUEST_TIMEOUT_S = 10.0
"""A client that stalls mid-request longer than this loses its connection (frees the worker)."""
RETRY_AFTER_S = 1
BUSY_TIMEOUT_S = 2.0
"""How long a request that will be refused may take to arrive before its connection is closed."""
MAX_REJECTING = 64
"""Threads answering 503 at once; past this a connection is closed unanswered (logged)."""
MAX_DRAINED_BYTES = 64 * 1024
"""A rejected request's body is read up to this much, so closing never resets the answer."""


class BadRequest(Exception):
    """A request the client must fix; `status` is the 4xx to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ServiceHttp:
    """Serve the endpoints for `service` until `close`."""

    def __init__(self, service: Service, config: HttpConfig):
        handler = type(
            "Handler",
            (_Handler,),
            {
                "service": service,
                "stall_seconds": config.stall_seconds,
                "max_body_bytes": config.max_body_bytes,
            },
        )
        self.server = _BoundedServer((config.host, config.port), handler, config, service)
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self.thread.start()
        host, port = self.address
        log.info("listening on http://%s:%d", host, port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _BoundedServer(HTTPServer):
    """An HTTPServer with `workers` threads and `queue` waiting slots; overflow gets 503."""

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[_Handler],
        config: HttpConfig,
        service: Service,
    ):
        self.request_queue_size = config.backlog  # read by server_activate() (listen)
        self._service = service
        self._slots = threading.BoundedSemaphore(config.workers + config.queue)
        self._rejecting = threading.BoundedSemaphore(MAX_REJECTING)
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix="http-worker")
        self._busy_handler = type(
            "BusyHandler", (handler,), {"busy": True, "timeout": BUSY_TIMEOUT_S}
        )
        super().__init__(address, handler)  # binds; on failure it calls server_close()

    def process_request(self, request: Any, client_address: Any) -> None:
        if self._slots.acquire(blocking=False):
            self._pool.submit(self._serve, request, client_address)
            return
        if self._rejecting.acquire(blocking=False):
            threading.Thread(
                target=self._reject, args=(request, client_address), daemon=True
            ).start()
            return
        self._service.metrics.http_busy.inc()
        log.warning("http overloaded: closing a connection unanswered client=%s", client_address)
        self.shutdown_request(request)

    def _serve(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def _reject(self, request: socket.socket, client_address: Any) -> None:
        try:
            self._busy_handler(request, client_address, self)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._rejecting.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            log.debug("http client went away client=%s", client_address)
        else:
            log.exception("http request failed client=%s", client_address)

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=False)


class _Handler(BaseHTTPRequestHandler):
    service: Service
    stall_seconds: float
    max_body_bytes: int
    busy = False
    timeout = REQUEST_TIMEOUT_S

    def do_GET(self) -> None:
        # Answered even when busy (cheap, no model lock): probes must not fail under a
        # burst of /predict, or the orchestrator would restart a healthy learner.
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
        if self.busy:
            self._send_busy()
            return
        if self.path != "/predict":
            self._send(404, {"error": f"no such endpoint {self.path}"})
            return
        try:
            features = self._features()
        except BadRequest as err:
            self._send(err.status, {"error": str(err)})
            return
        try:
            probabilities, version = self.service.predict_proba(features)
        except Exception as err:
            log.exception("predict failed rows=%d", len(features))
            self._send(500, {"error": f"prediction failed: {type(err).__name__}: {err}"})
            return
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
        doc = self._json_body()
        if not isinstance(doc, dict) or not ("features" in doc or "instances" in doc):
            raise BadRequest('expected {"features": [...]} or {"instances": [[...], ...]}')
        spec = self.service.spec
        rows = [doc["features"]] if "features" in doc else doc["instances"]
        if not isinstance(rows, list) or not rows:
            raise BadRequest('"instances" must be a non-empty list of samples')
        try:
            array = np.asarray(rows, dtype=np.float64).reshape((len(rows), *spec.feature_shape))
        except (TypeError, ValueError, OverflowError, RecursionError) as err:
            # OverflowError: an integer literal beyond float range; RecursionError: deep nesting.
            raise BadRequest(
                f"each sample must have shape {spec.feature_shape} of finite numbers: "
                f"{type(err).__name__}: {err}"
            ) from err
        if not np.isfinite(array).all():
            raise BadRequest("features contain NaN or infinity")
        if spec.dtype == "uint8" and ((array < 0) | (array > 255)).any():
            raise BadRequest("uint8 features must be in [0, 255]")
        return array.astype(spec.dtype)

    def _json_body(self) -> Any:
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            raise BadRequest("a Content-Length header is required", 411)
        try:
            length = int(raw_length)
        except ValueError as err:
            raise BadRequest(f"Content-Length must be an integer, got {raw_length!r}") from err
        if length > self.max_body_bytes:
            self.close_connection = True
            raise BadRequest(f"body of {length} bytes exceeds {self.max_body_bytes}", 413)
        if length <= 0:
            raise BadRequest("body is empty: send JSON")
        body = self.rfile.read(length)
        if len(body) < length:
            raise BadRequest(f"body ended after {len(body)} of {length} bytes")
        try:
            return json.loads(body)
        except RecursionError as err:
            raise BadRequest("body is not usable JSON: nested too deeply") from err
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, int digit limit
            raise BadRequest(f"body is not JSON: {err}") from err

    def _send_busy(self) -> None:
        """Read what the client sent (so closing cannot reset the answer), then 503."""
        try:
            length = min(int(self.headers.get("Content-Length") or 0), MAX_DRAINED_BYTES)
        except ValueError:
            length = 0
        if length > 0:
            self.rfile.read(length)
        self.service.metrics.http_busy.inc()
        self._send(
            503,
            {"error": f"busy: every worker is taken; retry after {RETRY_AFTER_S} s"},
            {"Retry-After": str(RETRY_AFTER_S)},
        )

    def _send(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        raw = strictjson.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http " + format, *args)
