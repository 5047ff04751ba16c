#!/usr/bin/env bash
# Set up everything the tests need, then run the checks: ruff, the import layers,
# mypy and pytest. Usage: bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh "cpu,dev"
export STREAMCL_REQUIRE_DATA=1  # the data is installed above: a missing dataset is a failure
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
