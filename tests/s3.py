"""A loopback S3 stand-in (moto) for the tests' durable broker (`tests.brokers.s3_broker`).

Tansu's s3:// storage against it keeps records and committed offsets across a broker kill
and restart, which is what the recovery tests need. Only the tests use it.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from streamcl.deploy.devbroker.tansu import (
    AWS_KEY,
    AWS_REGION,
    BUCKET,
    BrokerError,
    check_loopback,
    end_process,
    free_port,
    is_executable_file,
    port_is_free,
    s3_env,
    wait_listening,
)

log = logging.getLogger(__name__)


def find_moto_server() -> Path:
    """Locate `moto_server`: beside this Python first, then on PATH.

    The venv's bin comes first because that is where `pip install 'moto[server]'`
    put it, and a venv need not be activated for its python to run the tests.
    """
    beside = Path(sys.executable).parent / "moto_server"
    if is_executable_file(beside):
        return beside
    on_path = shutil.which("moto_server")
    if on_path:
        return Path(on_path)
    raise BrokerError(
        f"moto_server not found beside {sys.executable} nor on PATH: "
        "pip install 'moto[server]' boto3"
    )


class MotoServer:
    """A loopback `moto_server` holding an empty `tansu` bucket: S3 for a durable broker.

    Its state lives in its memory, so it outlives broker restarts but not itself.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int | None = None, *, start_timeout_s: float = 10.0
    ) -> None:
        check_loopback(host)
        if port is not None and not 0 < port < 65536:
            raise BrokerError(f"moto port must be in 1..65535, got {port}")
        self.host = host
        self.port = port
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """`http://host:port`, the S3 endpoint URL; known once started."""
        if self.port is None:
            raise BrokerError("moto_server has no port yet: call start() first")
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """The AWS_* variables Tansu needs to use this server as its s3:// storage."""
        return s3_env(self.endpoint)

    def start(self) -> None:
        """Launch moto_server, wait until it answers, then create the bucket."""
        if self._process is not None and self._process.poll() is None:
            raise BrokerError(f"moto_server at {self.endpoint} is already running")
        binary = find_moto_server()
        if self.port is None:
            self.port = free_port(self.host)
        # Else the bucket would be created on whoever holds the port.
        if not port_is_free(self.host, self.port):
            raise BrokerError(f"cannot start moto_server: {self.endpoint} is already in use")
        try:
            # Its per-request log is noise; failures show as a dead process or a timeout.
            self._process = subprocess.Popen(
                [str(binary), "-H", self.host, "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError as err:
            raise BrokerError(f"could not execute {binary}: {err}") from err
        try:
            self._wait_ready()
            self._create_bucket()
        except BaseException:
            self.stop()
            raise
        log.info("moto_server ready endpoint=%s pid=%d", self.endpoint, self._process.pid)

    def stop(self) -> None:
        """Stop moto_server (SIGTERM, then SIGKILL after 5 s); its data is gone."""
        if end_process(self._process, signal.SIGTERM, 5.0):
            log.info("moto_server stopped endpoint=%s", self.endpoint)
        self._process = None

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        process = self._process
        if process is None or self.port is None:
            raise BrokerError("moto_server was never started")
        wait_listening(process, self.host, self.port, self.start_timeout_s, "moto_server")

    def _create_bucket(self) -> None:
        try:
            import boto3
        except ImportError as err:
            raise BrokerError(
                "MotoServer needs boto3 to create its bucket: pip install boto3"
            ) from err
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=AWS_KEY,
            aws_secret_access_key=AWS_KEY,
            region_name=AWS_REGION,
        )
        try:
            client.create_bucket(Bucket=BUCKET)
        except Exception as err:
            raise BrokerError(
                f"could not create bucket {BUCKET!r} on moto_server {self.endpoint}: {err}"
            ) from err
