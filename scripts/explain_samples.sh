#!/usr/bin/env bash
# The main job: explain the sample images with the embedded EfficientNet-Lite0 and write overlays.
# Extra arguments go to `jaxattr explain` (e.g. --method gnl_ig --steps 32).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh core
.venv/bin/jaxattr explain examples/images --out outputs/samples "$@"
