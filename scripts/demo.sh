#!/usr/bin/env bash
# The main job: set up (scripts/setup_env.sh), then run the D-Flow demo. Extra arguments go to the
# demo command (see `dflow-fast demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
# the demo needs only the `data` extra (PNG grids, SSIM); scripts/test.sh installs the others
DFLOW_FAST_EXTRAS=${DFLOW_FAST_EXTRAS:-data} bash scripts/setup_env.sh
. .venv/bin/activate
dflow-fast demo "$@"
