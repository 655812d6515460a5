#!/usr/bin/env bash
# The main job: explain the sample images with the embedded EfficientNet-Lite0 (GNL-IG: Integrated
# Gradients through guided ReLU6 backward rules, the cleanest maps on this model) and write
# overlays to outputs/samples/. Extra arguments go to `jaxattr explain` (e.g. --panel, --steps 32).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh core
.venv/bin/jaxattr explain examples/images --method gnl_ig --out outputs/samples "$@"
