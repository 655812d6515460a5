#!/usr/bin/env bash
# Installs the full environment (PyTorch references included) and runs the test suite.
# Extra arguments go to pytest (e.g. -k resnet).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh full
export JAXATTR_OFFLINE=1 JAXATTR_HOME="${JAXATTR_HOME:-$PWD/.venv/jaxattr-home}"
.venv/bin/python -m pytest -n 2 --dist loadfile --durations=25 "$@"
