#!/usr/bin/env bash
# Set up everything dflow_fast needs on a fresh machine: a virtualenv in .venv with the CPU build of
# torch 2.13.0, the package (editable) with its test and data extras, and the offline datasets.
# Idempotent: a second run only checks. Usage: source-free, `bash scripts/setup_env.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test,data]"
# Fashion-MNIST is a Debian package (files under /usr/share/datasets/fashion-mnist/).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
python -c "import dflow_fast, torch; print('dflow_fast', dflow_fast.__version__, 'torch', torch.__version__)"
