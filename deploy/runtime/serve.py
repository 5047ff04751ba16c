"""Run the service process: signals, HTTP endpoints, the learning loop, the final report."""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import nullcontext
from types import FrameType
from typing import Any

from streamcl.deploy.runtime import distributed
from streamcl.deploy.runtime.config import ServiceConfig
from streamcl.deploy.runtime.http import ServiceHttp
from streamcl.deploy.runtime.lock import checkpoint_lock
from streamcl.deploy.runtime.service import Service
from streamcl.ingest import strictjson
from streamcl.ingest.errors import ConfigError

log = logging.getLogger(__name__)


def run_service(config: ServiceConfig, stop: threading.Event | None = None) -> dict[str, Any]:
    """Serve until SIGTERM/SIGINT (or `stop`, or the topic going idle); returns the report.

    On a signal the current poll's messages are learned, a final checkpoint is written
    and its offsets committed before returning. Refuses to start (`DirectoryInUseError`)
    while another process serves from the same checkpoint directory.
    """
    stop = stop or threading.Event()
    previous = _install_signal_handlers(stop)
    report_path = config.report
    try:
        if distributed.launched():
            with distributed.process_group(config) as (rank, world):
                report_path = distributed.rank_path(config.report, rank)
                # Rank 0 alone writes the checkpoint directory.
                lock = checkpoint_lock(config.checkpoint.dir) if rank == 0 else nullcontext()
                with lock:
                    report = _serve(distributed.RankService(config, rank, world), stop)
        else:
            with checkpoint_lock(config.checkpoint.dir):
                report = _serve(Service(config), stop)
    finally:
        _restore_signal_handlers(previous)
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(strictjson.dumps(report, indent=2) + "\n")
    return report


def _serve(service: Service, stop: threading.Event) -> dict[str, Any]:
    config = service.config
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
