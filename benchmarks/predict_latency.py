"""/predict latency (p50/p99) of `serve`'s HTTP server: 1 client vs 200 concurrent clients.

    python benchmarks/predict_latency.py [--clients 200] [--requests 10]

Each client opens a new connection per request (as most HTTP clients without pooling
do) and sends one Fashion-MNIST test image; every client starts at once (a barrier).
Counts 200s, 503s (busy, with Retry-After) and requests with no answer. The service
runs the default MLP-256 on 1 torch thread with the default http settings, against the
embedded Tansu broker (nothing is consumed: this measures the serving path alone).
Writes benchmarks/results/predict_latency.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _report import machine, write_results

from streamcl.deploy.devbroker.tansu import EmbeddedBroker
from streamcl.deploy.runtime.config import ServiceConfig
from streamcl.deploy.runtime.http import ServiceHttp
from streamcl.deploy.runtime.service import Service
from streamcl.ingest.datasets import load

RESULTS = Path(__file__).parent / "results" / "predict_latency.json"


def run_clients(
    address: tuple[str, int], body: bytes, clients: int, requests: int
) -> dict[str, Any]:
    """`clients` threads each send `requests` POSTs; latency percentiles of the 200s."""
    barrier = threading.Barrier(clients)
    latencies: list[float] = []
    statuses: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        barrier.wait()
        for _ in range(requests):
            began = time.perf_counter()
            connection = http.client.HTTPConnection(*address, timeout=120)
            try:
                connection.request("POST", "/predict", body=body)
                response = connection.getresponse()
                response.read()
                status = response.status
            except OSError as err:
                with lock:
                    failures.append(type(err).__name__)
                continue
            finally:
                connection.close()
            with lock:
                statuses.append(status)
                if status == 200:
                    latencies.append((time.perf_counter() - began) * 1000)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    ms = np.array(latencies) if latencies else np.zeros(1)
    return {
        "clients": clients,
        "requests": clients * requests,
        "ok_200": statuses.count(200),
        "busy_503": statuses.count(503),
        "other_status": len(statuses) - statuses.count(200) - statuses.count(503),
        "no_answer": len(failures),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
        "requests_per_second": round(len(statuses) / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--requests", type=int, default=10, help="per client")
    args = parser.parse_args()
    torch.set_num_threads(1)
    image = load("fashion-mnist").test_x[0]
    body = json.dumps({"features": image.tolist()}).encode()
    with tempfile.TemporaryDirectory() as workdir, EmbeddedBroker() as broker:
        config = ServiceConfig.model_validate(
            {
                "kafka": {"bootstrap_servers": broker.bootstrap_servers, "topic": "bench"},
                "learner": {"device": "cpu", "threads": 1},
                "checkpoint": {"dir": f"{workdir}/checkpoints"},
                "http": {"port": 0},
            }
        )
        service = Service(config)
        server = ServiceHttp(service, config.http)
        server.start()
        try:
            run_clients(server.address, body, 8, 5)  # warm-up
            single = run_clients(server.address, body, 1, args.requests * 20)
            print(json.dumps(single))
            concurrent = run_clients(server.address, body, args.clients, args.requests)
            print(json.dumps(concurrent))
        finally:
            server.close()
            service.close()
    write_results(
        RESULTS,
        {
            "benchmark": "POST /predict, one Fashion-MNIST image, MLP-256, new connection "
            "per request",
            "command": f"python benchmarks/predict_latency.py --clients {args.clients} "
            f"--requests {args.requests}",
            "threads": torch.get_num_threads(),
            "http": config.http.model_dump(include={"backlog", "workers", "queue"}),
            "single_client": single,
            "concurrent": concurrent,
            "p50_ratio_concurrent_vs_single": round(concurrent["p50_ms"] / single["p50_ms"], 1),
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
