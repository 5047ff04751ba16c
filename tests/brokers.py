"""Real-broker fixtures for any test module; import them by name to use them.

    from tests.brokers import memory_broker, s3_broker  # noqa: F401

Without a Tansu binary (or moto_server and boto3, for `s3_broker`) the tests that
use them skip, unless STREAMCL_REQUIRE_BROKER=1 makes that a failure.

`memory_broker` is session-scoped, but pytest keys a fixture by the module that
defines it: each module importing it gets its own broker, shared by that module's
tests and stopped at the end of the session. Tests sharing one broker must use
their own topic names (`unique_topic`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streamcl.deploy.devbroker.tansu import BrokerError, EmbeddedBroker, find_tansu_binary
from tests.s3 import MotoServer, find_moto_server

# Group joins take ~max(1 s, session_timeout/2) on Tansu; defaults make it ~23 s.
FAST_GROUP: dict[str, Any] = {
    "session_timeout_ms": 2000,
    "heartbeat_interval_ms": 300,
    "max_poll_interval_ms": 10_000,
    "request_timeout_ms": 5000,
}


def unique_topic(prefix: str = "t") -> str:
    """A topic name no other test uses, so tests can share one broker."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def require_broker(*, s3: bool = False) -> None:
    """Skip the calling test when the broker (and for s3 its S3 stand-in) cannot run."""
    try:
        find_tansu_binary()
        if s3:
            import boto3  # noqa: F401

            find_moto_server()
    except (BrokerError, ImportError) as err:
        if os.environ.get("STREAMCL_REQUIRE_BROKER") == "1":
            pytest.fail(f"STREAMCL_REQUIRE_BROKER=1 but the broker cannot run: {err}")
        pytest.skip(f"real broker unavailable: {err}")


@pytest.fixture(scope="session")
def memory_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """A running in-memory Tansu broker on a free loopback port."""
    require_broker()
    with EmbeddedBroker(log_dir=tmp_path_factory.mktemp("tansu-memory")) as broker:
        yield broker


@pytest.fixture
def s3_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A running Tansu broker whose storage is a fresh moto S3: survives kill + restart."""
    require_broker(s3=True)
    with (
        MotoServer() as moto,
        EmbeddedBroker(storage="s3", s3_endpoint=moto.endpoint, log_dir=tmp_path) as broker,
    ):
        yield broker
