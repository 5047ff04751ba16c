"""Run the service process: signals, HTTP endpoints, the learning loop, the final report."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

from deploy.config import ServiceConfig
from deploy.http import ServiceHttp
from deploy.lock import checkpoint_lock
from deploy.service import Service
from ingest import strictjson
from ingest.errors import ConfigError

log = logging.getLogger(__name__)


def run_service(config: ServiceConfig, stop: threading.Event | None = None) -> dict[str, Any]:
    """Serve until SIGTERM/SIGINT (or `stop`, or the topic going idle); returns the report.

    On a signal the current poll's messages are learned, a final checkpoint is written
    and its offsets committed before returning. Refuses to start (`DirectoryInUseError`)
    while another process serves from the same checkpoint directory.
    """
    stop = stop or threading.Event()
    previous = _install_signal_handlers(stop)
    try:
        with checkpoint_lock(config.checkpoint.dir):
            report = _serve(config, stop)
    finally:
        _restore_signal_handlers(previous)
    if config.report is not None:
        config.report.parent.mkdir(parents=True, exist_ok=True)
        config.report.write_text(strictjson.dumps(report, indent=2) + "\n")
    return report


def _serve(config: ServiceConfig, stop: threading.Event) -> dict[str, Any]:
    service = Service(config)
    try:
        http = _listen(service, config)
    except BaseException:
        service.close()
        raise
    http.start()
    try:
        return service.run(stop)
    finally:
        http.close()
        service.close()


def _listen(service: Service, config: ServiceConfig) -> ServiceHttp:
    """Bind the HTTP port; a port in use is a one-line start-up error, not a traceback."""
    try:
        return ServiceHttp(service, config.http)
    except OSError as err:
        raise ConfigError(
            f"cannot listen on http://{config.http.host}:{config.http.port}: {err.strerror or err}"
        ) from err


def _install_signal_handlers(stop: threading.Event) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.warning("signal %s: finishing the current batch, then checkpointing", signum)
        stop.set()

    return {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore_signal_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
