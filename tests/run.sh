#!/usr/bin/env bash
# Set up everything the tests need, then run the checks: ruff, the import layers,
# mypy and pytest (the Avalanche bridge's tests in .venv-avalanche).
# Usage: bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh "cpu,broker,dev,avalanche"
# Installed above: a missing dataset or broker is a failure here, not a skip.
export STREAMCL_REQUIRE_DATA=1 STREAMCL_REQUIRE_BROKER=1 STREAMCL_REQUIRE_PROMETHEUS=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# mypy and import-linter read files, not import hooks: they see the `streamcl` namespace
# through folder links (pyproject's mypy_path); Python itself goes through the editable install.
mkdir -p build/namespace/streamcl
for part in ingest memory learner evaluation deploy; do
  ln -sfn "../../../$part" "build/namespace/streamcl/$part"
done
PYTHONPATH=build/namespace .venv/bin/lint-imports
.venv/bin/mypy
.venv/bin/python -m pytest --ignore=tests/avalanche "$@"
# The Avalanche bridge in its own venv (torchvision stays out of .venv); ~1 min.
STREAMCL_REQUIRE_AVALANCHE=1 .venv-avalanche/bin/python -m pytest tests/avalanche "$@"
