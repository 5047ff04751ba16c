"""Scale-out: `streamcl serve` under torchrun, two gloo ranks over a 4-partition topic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deploy.broker import EmbeddedBroker
from deploy.config import ServiceConfig
from deploy.distributed import rank_config, rank_path, share
from deploy.serve import run_service
from ingest.errors import ConfigError
from ingest.recorded import Frame, StreamReader
from tests.brokers import unique_topic
from tests.service_helpers import PLAIN_LEARNER, learned_offsets, produce, service_config

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 4
DIGITS = 1348


def test_shares_split_the_global_budgets_exactly() -> None:
    assert [share(10, r, 3) for r in range(3)] == [4, 3, 3]
    config = ServiceConfig.model_validate(
        {"learner": {"batch_size": 10, "memory": 1001}, "report": "/tmp/r.json"}
    )
    ranks = [rank_config(config, r, 2) for r in range(2)]
    assert sum(c.learner.memory for c in ranks) == 1001
    assert [c.learner.batch_size for c in ranks] == [5, 5]
    assert [c.report for c in ranks] == [Path("/tmp/r.json"), Path("/tmp/r.rank1.json")]
    assert rank_path(None, 1) is None


def test_budgets_smaller_than_the_rank_count_are_refused() -> None:
    config = ServiceConfig.model_validate({"learner": {"batch_size": 2}})
    with pytest.raises(ConfigError, match="at least the number of ranks"):
        rank_config(config, 0, 3)


def publish_round_robin(broker: EmbeddedBroker, topic: str, stream: Path) -> None:
    """Sample i goes to partition i % 4: every partition keeps the stream's task order."""
    with StreamReader(stream) as reader:
        payloads = [frame.payload for frame in reader if isinstance(frame, Frame)]
    assert len(payloads) == DIGITS
    for partition in range(PARTITIONS):
        produce(broker, topic, payloads[partition::PARTITIONS], partition=partition)


def torchrun(config: ServiceConfig, workdir: Path, ranks: int) -> list[dict[str, Any]]:
    """`streamcl serve` under torchrun; every rank's report."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "service.json"
    path.write_text(json.dumps(config.model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={ranks}", "-m", "deploy.cli", "serve", "--config", str(path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    assert config.report is not None
    return [json.loads(rank_path(config.report, r).read_text()) for r in range(ranks)]  # type: ignore[union-attr]


def test_two_ranks_learn_every_offset_once_into_identical_models(
    memory_broker: EmbeddedBroker, digits_stream: Path, tmp_path: Path
) -> None:
    topic = unique_topic("scale")
    memory_broker.create_topic(topic, partitions=PARTITIONS)
    publish_round_robin(memory_broker, topic, digits_stream)
    heldout = str(digits_stream) + ".eval.npz"
    learner = {"memory": 1000, **PLAIN_LEARNER}
    common: dict[str, Any] = {"until_idle": 1.5, "heldout": heldout, "learner": learner}
    two = service_config(
        memory_broker, topic, tmp_path / "two", report=str(tmp_path / "two/report.json"), **common
    )
    reports = torchrun(two, tmp_path / "two", ranks=2)

    # Every rank applied the same averaged steps: bit-identical parameters.
    digests = {r["distributed"]["model_sha256"] for r in reports}
    assert len(digests) == 1
    owned = sorted(p for r in reports for p in r["distributed"]["partitions"])
    assert owned == list(range(PARTITIONS))  # each partition had exactly one owner
    learned = learned_offsets(tmp_path / "two/audit.jsonl")
    learned += learned_offsets(tmp_path / "two/audit.rank1.jsonl")
    assert sum(learned.values()) == DIGITS and set(learned.values()) == {1}
    assert reports[0]["samples_learned_all_ranks"] == DIGITS

    one = service_config(
        memory_broker, topic, tmp_path / "one", kafka={"group_id": f"one-{topic}"}, **common
    )
    single = run_service(one)
    # Measured on this stream (seed 0): one rank 0.XXX, two ranks 0.XXX.
    assert abs(reports[0]["final_average_accuracy"] - single["final_average_accuracy"]) <= 0.02
