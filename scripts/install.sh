#!/usr/bin/env bash
# Install what this project needs into the current Python environment, offline-friendly:
# torch is pinned to the CPU build 2.13.0 only when no torch is installed yet, because an unpinned
# `torch` resolves to a multi-GB CUDA build on CPU-only machines.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet -r requirements.txt
# Editable install of the library packages (scripts also run from the repo root without it). Builds
# with the installed setuptools when there is one, else lets pip fetch it.
"$PY" -m pip install --quiet -e . --no-deps --no-build-isolation 2>/dev/null \
  || "$PY" -m pip install --quiet -e . --no-deps
