#!/usr/bin/env bash
# Set up everything dflow_fast needs on a fresh machine: a virtualenv in .venv with the CPU build of
# torch 2.13.0, the package (editable) with its compiled core dflow_fast._C and its test, data and
# bench extras, and the offline datasets. Idempotent: a second run only checks (and recompiles nothing
# that is up to date). Usage: source-free, `bash scripts/setup_env.sh`; DFLOW_FAST_EXTRAS=data (a
# comma-separated list) installs only those extras (scripts/demo.sh: the demo needs only `data`).
# The C++ extension compiles against the torch installed here (no GPU or nvcc needed: CPU kernels
# only); DFLOW_FAST_NO_EXT=1 installs pure Python instead. Other switches: see setup.py.
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
# Build tools first: the extension builds with --no-build-isolation against the torch above (an
# isolated build would download a multi-GB CUDA torch); ninja compiles its files in parallel.
python -m pip install -q setuptools wheel ninja
# bench: the peers (torchdiffeq, flow_matching) that the benchmark suite's parity cases compare
# with; diffusers, flow_matching: the adapters' libraries, whose tests run in CI. Never imported
# by `import dflow_fast` itself. molecules: QM9 (qm9pack, ~100 MB) and RDKit.
EXTRAS=${DFLOW_FAST_EXTRAS:-test,data,bench,diffusers,flow_matching,molecules}
python -m pip install -q --no-build-isolation -e ".[$EXTRAS]"
# Fashion-MNIST is a Debian package (files under /usr/share/datasets/fashion-mnist/).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
python -c "import dflow_fast, torch; i = dflow_fast.build_info(); print('dflow_fast', \
dflow_fast.__version__, 'torch', torch.__version__, 'backends', ','.join(i['backends']))"
