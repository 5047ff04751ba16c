#!/usr/bin/env bash
# The main job on an embedded default: start a local Kafka-compatible broker (Tansu),
# publish the Split Fashion-MNIST stream (5 tasks x 2 classes) to it, run the online
# learner service with experience replay until the stream is consumed, print the
# summary and stop everything. Usage: bash deploy/quickstart.sh [extra demo flags]
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh "cpu,broker"
.venv/bin/streamcl demo --workdir runs/demo "$@"
