#!/usr/bin/env bash
# Install what streamcl needs into ./.venv: Debian's Fashion-MNIST and Prometheus packages
# (when apt is usable), the CPU build of PyTorch, and the project itself.
# Idempotent: a second run only checks. Usage: bash deploy/setup.sh [EXTRAS]
# EXTRAS containing 'avalanche' also builds ./.venv-avalanche (see the end).
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS="${1:-cpu}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${STREAMCL_TORCH_VERSION:-2.13.0}"
APT_PACKAGES=(dataset-fashion-mnist prometheus)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null; then
    echo "setup: apt-get install ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: no apt-get; install ${missing[*]} yourself (or use --dataset digits)" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# Pin torch first: an unpinned 'torch' would pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: pip install torch==$TORCH_VERSION"
  "${PIP[@]}" "torch==$TORCH_VERSION"
fi
CORE_EXTRAS="$(echo ",$EXTRAS," | sed 's/,avalanche,/,/g; s/^,//; s/,$//')"
echo "setup: pip install -e .[$CORE_EXTRAS]"
"${PIP[@]}" -e ".[$CORE_EXTRAS]"

# The Avalanche bridge: avalanche-lib 0.6 needs torchvision, and torchvision from PyPI
# does not import beside the core torch, so it gets its own venv with a matching pair.
if [[ ",$EXTRAS," == *,avalanche,* ]]; then
  AV_TORCH="${STREAMCL_AVALANCHE_TORCH_VERSION:-2.14.1}"
  AV_VISION="${STREAMCL_AVALANCHE_TORCHVISION_VERSION:-0.29.1}"
  if [ ! -x .venv-avalanche/bin/python ]; then
    echo "setup: creating .venv-avalanche"
    "$PYTHON" -m venv .venv-avalanche
  fi
  AV_PIP=(.venv-avalanche/bin/python -m pip install -q --disable-pip-version-check)
  if ! .venv-avalanche/bin/python -c "import torchvision" 2>/dev/null; then
    echo "setup: .venv-avalanche: pip install torch==$AV_TORCH torchvision==$AV_VISION"
    "${AV_PIP[@]}" "torch==$AV_TORCH" "torchvision==$AV_VISION"
  fi
  echo "setup: .venv-avalanche: pip install -e .[cpu,avalanche] pytest"
  "${AV_PIP[@]}" -e ".[cpu,avalanche]" "pytest>=8"
fi
