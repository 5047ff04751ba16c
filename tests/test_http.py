"""/predict under bad input and load: a real Service (real broker) behind the real server."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamcl.deploy.devbroker.tansu import EmbeddedBroker
from streamcl.deploy.runtime.config import HttpConfig
from streamcl.deploy.runtime.http import ServiceHttp
from streamcl.deploy.runtime.service import Service
from tests.brokers import memory_broker, unique_topic  # noqa: F401
from tests.service_helpers import service_config, wait_until

SAMPLE = np.full((8, 8), 3, dtype=np.uint8).tolist()


@pytest.fixture(scope="module")
def service(
    memory_broker: EmbeddedBroker,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Service]:
    """A constructed service (model on 8x8 digits); nothing consumes, /predict is live."""
    topic = unique_topic("http")
    config = service_config(memory_broker, topic, tmp_path_factory.mktemp("http"))
    built = Service(config)
    try:
        yield built
    finally:
        built.close()


def serve_http(service: Service, **http: Any) -> ServiceHttp:
    server = ServiceHttp(service, HttpConfig(port=0, **http))
    server.start()
    return server


@pytest.fixture(scope="module")
def server(service: Service) -> Iterator[ServiceHttp]:
    started = serve_http(service)
    try:
        yield started
    finally:
        started.close()


def post(
    server: ServiceHttp, body: bytes, headers: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, dict[str, str], Any]:
    """POST /predict; returns (status, headers, decoded JSON body)."""
    host, port = server.address
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        if headers is None:
            connection.request("POST", "/predict", body=body)
        else:
            connection.putrequest("POST", "/predict", skip_accept_encoding=True)
            for name, value in headers.items():
                connection.putheader(name, value)
            connection.endheaders(body)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        connection.close()


def busy_total(service: Service) -> float:
    value = service.metrics.registry.get_sample_value("streamcl_http_busy_responses_total")
    assert value is not None
    return value


def nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


BAD_BODIES = {
    # Used to end in RecursionError / OverflowError tracebacks with no answer at all.
    "deeply nested JSON": ('{"features": ' + nested(100_000) + "}", 400, "nested too deeply"),
    "400-digit integer": (
        json.dumps({"features": [[int("9" * 400)] * 8] * 8}),
        400,
        "OverflowError",
    ),
    "5000-digit integer": ('{"features": [' + "9" * 5000 + "]}", 400, "not JSON"),
    "nesting numpy cannot shape": ('{"features": ' + nested(500) + "}", 400, "shape (8, 8)"),
    "not JSON": ("features=1", 400, "not JSON"),
    "invalid UTF-8": (b"\xff\xfe{}".decode("latin-1"), 400, "not JSON"),
    "a list": ("[1, 2]", 400, "expected"),
    "instances not a list": ('{"instances": 5}', 400, "non-empty list"),
    "no instances": ('{"instances": []}', 400, "non-empty list"),
    "a mapping as sample": ('{"features": {"a": 1}}', 400, "shape (8, 8)"),
    "strings as pixels": (json.dumps({"features": [["x"] * 8] * 8}), 400, "shape (8, 8)"),
    "ragged rows": (json.dumps({"features": [[1] * 8] * 7 + [[1] * 3]}), 400, "shape (8, 8)"),
    "infinity": ('{"features": [' + ",".join(["1e999"] * 64) + "]}", 400, "NaN or infinity"),
    "NaN": ('{"features": [' + ",".join(["NaN"] * 64) + "]}", 400, "NaN or infinity"),
    "out of uint8 range": (json.dumps({"features": [[300] * 8] * 8}), 400, "[0, 255]"),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_every_bad_body_gets_a_4xx_with_a_reason(server: ServiceHttp, case: str) -> None:
    body, status, reason = BAD_BODIES[case]
    got, _, answer = post(server, body.encode("latin-1"))
    assert got == status, answer
    assert reason in answer["error"]


def test_body_size_and_length_header_are_checked(service: Service) -> None:
    small = serve_http(service, max_body_bytes=100)
    try:
        status, _, answer = post(small, json.dumps({"features": SAMPLE}).encode())
        assert status == 413 and "exceeds 100" in answer["error"]
        status, _, answer = post(small, b"", headers={"Content-Type": "application/json"})
        assert status == 411 and "Content-Length" in answer["error"]
        status, _, answer = post(small, b"{}", headers={"Content-Length": "two"})
        assert status == 400 and "integer" in answer["error"]
    finally:
        small.close()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=5)
    | st.sampled_from([10**400, -(10**400)]),
    lambda children: (
        st.lists(children, max_size=9)
        | st.dictionaries(st.sampled_from(["features", "instances", "x"]), children, max_size=3)
    ),
    max_leaves=80,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=json_values.map(lambda v: json.dumps(v).encode())
    | json_values.map(lambda v: json.dumps({"features": v}).encode())
    | json_values.map(lambda v: json.dumps({"instances": v}).encode())
    | st.binary(min_size=1, max_size=200)
)
def test_any_body_is_answered_with_json_and_never_a_5xx(server: ServiceHttp, body: bytes) -> None:
    status, _, answer = post(server, body)
    assert status == 200 or (400 <= status < 500 and answer["error"]), answer


def test_a_busy_server_answers_503_with_retry_after(service: Service) -> None:
    """One worker and one queue slot, both held: every further request is refused at once."""
    busy = serve_http(service, workers=1, queue=1)
    body = json.dumps({"features": SAMPLE}).encode()
    results: list[tuple[int, dict[str, str], Any]] = []
    before = busy_total(service)

    def call() -> None:
        results.append(post(busy, body))

    threads = [threading.Thread(target=call) for _ in range(10)]
    try:
        with service.model_lock:  # predict waits for it: the two admitted requests stay busy
            for thread in threads:
                thread.start()
            wait_until(lambda: len(results) == 8, 30, "eight refusals")
            refused = list(results)
            host, port = busy.address
            probe = http.client.HTTPConnection(host, port, timeout=30)
            probe.request("GET", "/healthz")  # probes still answer: no restart under load
            health = probe.getresponse()
            # Answered by the health check itself (ok, or stalled: nothing consumes here).
            assert json.loads(health.read())["status"] in ("ok", "stalled")
            assert "Retry-After" not in dict(health.getheaders())
            probe.close()
        for thread in threads:
            thread.join(30)
    finally:
        busy.close()
    assert [status for status, _, _ in refused] == [503] * 8
    assert all(headers["Retry-After"] == "1" for _, headers, _ in refused)
    assert all("busy" in answer["error"] for _, _, answer in refused)
    assert sorted(status for status, _, _ in results) == [200, 200] + [503] * 8
    assert busy_total(service) - before == 8


def test_200_concurrent_clients_all_get_an_answer(server: ServiceHttp) -> None:
    """All connect at once (a barrier); each gets 200 or 503, none hangs or is reset."""
    clients = 200
    barrier = threading.Barrier(clients)
    outcomes: list[object] = []
    body = json.dumps({"features": SAMPLE}).encode()

    def call() -> None:
        barrier.wait()
        try:
            status, _, answer = post(server, body, timeout=30)
            outcomes.append(status if status == 503 else answer["predictions"])
        except OSError as err:
            outcomes.append(err)

    threads = [threading.Thread(target=call) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    failures = [o for o in outcomes if not (o == 503 or isinstance(o, list))]
    assert failures == []
    assert len(outcomes) == clients
    answered = [o for o in outcomes if isinstance(o, list)]
    assert answered and all(len(o) == 1 and 0 <= o[0] < 10 for o in answered)
