#!/usr/bin/env bash
# Install what the tests need, then run them layer by layer, printing each layer's time.
# Usage: scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
scripts/install.sh --dev
echo "layer install: $(( $(date +%s) - start ))s"

export FACEFARM_MODEL_STORE="${FACEFARM_MODEL_STORE:-$HOME/.cache/facefarm/models}"
export FACEFARM_TEST_MODEL_STORE="${FACEFARM_TEST_MODEL_STORE:-$FACEFARM_MODEL_STORE}"
export PYTHONUNBUFFERED=1
PY=.venv/bin/python

t=$(date +%s)
.venv/bin/ruff check shared dispatcher worker facefarm tests bench scripts
.venv/bin/lint-imports
echo "layer lint: $(( $(date +%s) - t ))s"

status=0
for layer in unit integration e2e; do
  [ -d "tests/$layer" ] || continue
  t=$(date +%s)
  set +e
  $PY -m pytest "tests/$layer" -q --durations=15 "$@"
  rc=$?
  set -e
  echo "layer $layer: $(( $(date +%s) - t ))s (exit $rc)"
  # 5 = no tests collected in this layer: not a failure of the layer.
  if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then status=$rc; fi
done
echo "total: $(( $(date +%s) - start ))s"
exit $status
