#!/usr/bin/env bash
# Install the project and run its test suite (the README's test command; CI calls this).
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
bash scripts/install.sh
"$PY" -m pip install --quiet "pytest>=7"
"$PY" -m pytest -q tests "$@"
