#!/usr/bin/env bash
# Install, build a short demo clip from face photos that ship in installed packages, and render it
# face-swapped on the embedded default (private Redis, local workers, local files; GPU if present).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
mkdir -p demo
.venv/bin/python scripts/make_demo_inputs.py --out demo
.venv/bin/facefarm render demo/input.mp4 --face demo/face.png -o demo/output.mp4 \
  --swapper "${FACEFARM_DEMO_SWAPPER:-mesh}" --chunk-frames 24 --preset veryfast
echo "demo: wrote demo/output.mp4"
