#!/usr/bin/env bash
# Create .venv (when missing) and install vfmkd with its test and export (ONNX) dependencies into it.
# Usage: bash scripts/setup_env.sh            (VENV=path and PYTHON=python3.x to choose)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.vfmkd-installed"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first: the largest download, and its build decides torchvision's.
"$VENV/bin/python" -m pip install --quiet "torch>=2.4" "torchvision>=0.19"
# The official SAM 2 package ships as source: build it against the torch above (no isolated
# build environment that would fetch another torch) and without its optional CUDA extension
# (it only speeds up video mask post-processing, which vfmkd does not use).
"$VENV/bin/python" -m pip install --quiet "setuptools>=64" wheel
SAM2_BUILD_CUDA=0 "$VENV/bin/python" -m pip install --quiet --no-build-isolation "sam2>=1.1.0" "segment-anything>=1.0"
"$VENV/bin/python" -m pip install --quiet -r requirements.txt
"$VENV/bin/python" -m pip install --quiet -e ".[test,export]"
touch "$STAMP"
echo "vfmkd installed in $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
