#!/usr/bin/env bash
# Install everything FaceFarm needs on a fresh Debian/Ubuntu machine, idempotently:
# system packages (ffmpeg, redis-server), a virtualenv in .venv, torch (CPU build where there is no
# NVIDIA GPU), the project, and the shipped model weights (`facefarm models fetch`).
# Usage: scripts/install.sh [--dev]      (--dev adds the test tools)
set -euo pipefail
cd "$(dirname "$0")/.."

DEV=0
[ "${1:-}" = "--dev" ] && DEV=1
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need_apt=()
command -v ffmpeg >/dev/null 2>&1 || need_apt+=(ffmpeg)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
python3 -m venv --help >/dev/null 2>&1 || need_apt+=(python3-venv)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
if [ "$DEV" = 1 ]; then
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
  command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install: apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

VENV="${FACEFARM_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip wheel setuptools >/dev/null

# torch: keep a CUDA build where a GPU exists; otherwise the CPU wheel (this machine keeps one on disk).
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" install "${FACEFARM_TORCH_SPEC:-torch>=2.4,<3}"
  else
    "${PIP[@]}" install "${FACEFARM_TORCH_SPEC:-torch==2.13.0}"
  fi
fi

# Keep that torch: a dependency's own pin (onnx2torch wants torchvision, and the newest torchvision
# wants the newest torch) would otherwise swap it for a multi-GB CUDA build, or replace a GPU
# machine's CUDA build. pip's own constraints (/etc/xdg/pip) are kept beside ours.
TORCH_PIN="$VENV/torch-constraint.txt"
"$VENV/bin/python" -W ignore -c "import torch; print('torch==' + torch.__version__.split('+')[0])" 2>/dev/null >"$TORCH_PIN"
PIP_CONSTRAINTS=(-c "$TORCH_PIN")
PIP_SYS_CONSTRAINT=$("$VENV/bin/python" -m pip config get global.constraint 2>/dev/null || true)
if [ -n "$PIP_SYS_CONSTRAINT" ] && [ -f "$PIP_SYS_CONSTRAINT" ]; then PIP_CONSTRAINTS+=(-c "$PIP_SYS_CONSTRAINT"); fi
if [ "$DEV" = 1 ]; then
  "${PIP[@]}" install "${PIP_CONSTRAINTS[@]}" -e ".[dev]"
else
  "${PIP[@]}" install "${PIP_CONSTRAINTS[@]}" -e .
fi
# torchvision is never needed; a mismatched one breaks `import torch` users, so keep it out.
"${PIP[@]}" uninstall -y torchvision >/dev/null 2>&1 || true
# insightface pulls the GUI build of OpenCV (needs libGL); keep only the headless one.
if "$VENV/bin/python" -m pip show opencv-python >/dev/null 2>&1; then
  "${PIP[@]}" uninstall -y opencv-python >/dev/null
  "${PIP[@]}" install --force-reinstall --no-deps "opencv-python-headless>=4.9,<6" >/dev/null
fi

STORE="${FACEFARM_MODEL_STORE:-$HOME/.cache/facefarm/models}"
"$VENV/bin/facefarm" models fetch --store "$STORE"
echo "install: ok (venv $VENV, model store $STORE)"
