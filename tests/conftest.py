"""Shared fixtures: small real streams built from scikit-learn's bundled digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streamcl.ingest.datasets import load_digits
from streamcl.ingest.scenarios import ScenarioConfig, build, write

# One embedded broker for the whole run (fixtures memory_broker, s3_broker).
pytest_plugins = ["tests.brokers"]

# Tests measure behaviour, not speed: one thread keeps them deterministic and polite
# to whatever else shares the machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_stream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class-incremental digits, 5 tasks x 2 classes (1,348 training samples)."""
    path = tmp_path_factory.mktemp("streams") / "digits-ci.scs"
    write(build(load_digits(), ScenarioConfig(tasks=5, seed=0)), path)
    return path
