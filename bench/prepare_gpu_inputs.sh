#!/usr/bin/env bash
# Prepare gpu_inputs/ for an offline CUDA machine (the device tool's): what bench/gpu_check.sh
# needs there that is not in the tree. gpu_inputs/ is git-ignored; carry it (the device tool's
# `carry: ["gpu_inputs"]`, about 10 MB).
#
#   bash bench/prepare_gpu_inputs.sh
#
#   gpu_inputs/wheels/          diffusers and flow_matching (the adapter tests of the parity stage,
#                               the peers of `gradient`), with the pure-Python packages diffusers
#                               needs beyond that machine's image -> PEER_WHEELS
#   gpu_inputs/fashion-mnist/   the Fashion-MNIST test files (e2e, fastpath, runner, demo)
#                               -> DFLOW_FAST_FASHION_MNIST_DIR
#   gpu_inputs/lbfgs_before.py  L-BFGS before issue 15's host-sync work (stage lbfgs)
#                               -> LBFGS_BEFORE_FILE
#   gpu_inputs/env.sh           those three variables and DFLOW_FAST_COMMIT (the device's copy of
#                               the tree has no usable git): `source gpu_inputs/env.sh` there
#
# The versions of diffusers and flow_matching are the ones this checkout's .venv tests with. Run
# it after the last commit before the device call: env.sh names HEAD as the commit that ran.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=gpu_inputs
LBFGS_BEFORE_REV=${LBFGS_BEFORE_REV:-04db25b}  # the last commit with the syncing L-BFGS
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

rm -rf "$DEST"
mkdir -p "$DEST/wheels" "$DEST/fashion-mnist"
pins=()
for pkg in diffusers flow_matching; do
  v=$("$PY" -c "import importlib.metadata as m; print(m.version('$pkg'))" 2>/dev/null) \
    || { echo "$pkg is not installed in $PY: run scripts/setup_env.sh first" >&2; exit 1; }
  pins+=("$pkg==$v")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DEST/wheels" "${pins[@]}" \
  importlib_metadata zipp

src=${DFLOW_FAST_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
for f in t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
  [ -f "$src/$f" ] || { echo "missing $src/$f (apt-get install dataset-fashion-mnist)" >&2; exit 1; }
  cp "$src/$f" "$DEST/fashion-mnist/"
done

git show "$LBFGS_BEFORE_REV:dflow_fast/optim/lbfgs.py" > "$DEST/lbfgs_before.py"

cat > "$DEST/env.sh" <<EOF
export PEER_WHEELS=$DEST/wheels
export DFLOW_FAST_FASHION_MNIST_DIR=$DEST/fashion-mnist
export LBFGS_BEFORE_FILE=$DEST/lbfgs_before.py
export DFLOW_FAST_COMMIT=$(git rev-parse HEAD)
EOF
du -sh "$DEST"
ls "$DEST/wheels"
echo "on the CUDA machine: source $DEST/env.sh && bash bench/gpu_check.sh STAGE ..."
