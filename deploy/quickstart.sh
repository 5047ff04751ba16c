#!/usr/bin/env bash
# The main job on an embedded default: build the Split Fashion-MNIST stream
# (5 tasks x 2 classes) and replay it through the online learner with experience
# replay, printing the summary. Usage: bash deploy/quickstart.sh [extra replay flags]
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh cpu
mkdir -p runs
STREAM=runs/split-fmnist.scs
if [ ! -f "$STREAM" ]; then
  .venv/bin/streamcl stream make --dataset fashion-mnist --scenario class-incremental \
    --tasks 5 --seed 0 --out "$STREAM"
fi
.venv/bin/streamcl replay --stream "$STREAM" --strategy er --memory 1000 \
  --memory-policy class-balanced --seed 0 --report runs/er-report.json --plots runs/plots "$@"
