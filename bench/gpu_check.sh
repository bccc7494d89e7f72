#!/usr/bin/env bash
# GPU verification of the compiled core, in one call on a CUDA machine (see bench/results/README.md):
#   1. build the extension with the CUDA kernels against the machine's own torch (no venv, offline);
#   2. the parity suites for the cuda and triton backends (fp32, fp16, bf16, fp64);
#   3. kernel microbenchmarks (bandwidth vs copy bandwidth, speedup vs eager PyTorch);
#   4. the end-to-end gradient benchmark through the 35M-parameter U-Net;
#   5. peers (torchdiffeq, flow_matching, checkpoint), D-Flow end to end, the benchmark suite.
# Results (JSON, Markdown, logs) go to ${OUT:-bench/results/gpu}; a short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python}
status=0
step() { echo; echo "== $*"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"

step "build (DFLOW_FAST_CUDA=1)"
export DFLOW_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
if ! $PY -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
$PY -c "import json, dflow_fast; print(json.dumps(dflow_fast.build_info(), indent=1))" | tee "$OUT/build_info.json"

step "parity: cuda and triton backends, torch reference"
$PY -m pytest tests/test_ops_cuda.py tests/test_ops_triton.py tests/test_ops_cpp.py tests/test_solve.py \
    -q -p no:cacheprovider -x --junitxml="$OUT/parity.xml" 2>&1 | tail -25 | tee "$OUT/parity.txt" \
  || status=1

step "kernel microbenchmarks"
$PY bench/bench_kernels.py --device cuda --out "$OUT/kernels_cuda.json" 2>&1 | tail -60 || status=1

step "gradient benchmark (35M U-Net, 64x64)"
$PY bench/bench_gradient.py --device cuda --config gpu --steps 5 10 20 40 --batch 8 \
    --methods reference backprop adjoint-torch adjoint-cuda adjoint-triton \
    --out "$OUT/gradient_cuda.json" --plot 2>&1 | tail -30 || status=1

# Benchmark runs added with bench_peers.py / bench_e2e.py / test_bench_suite.py. The peers are
# pure-Python wheels from PyPI; on an offline machine point PEER_WHEELS at a folder holding them
# (`pip download --no-deps -d wheels torchdiffeq flow_matching` where PyPI is reachable).
step "peers: one gradient vs reference, checkpoint, torchdiffeq, flow_matching (35M U-Net)"
if [ -n "${PEER_WHEELS:-}" ]; then
  $PY -m pip install -q --no-deps --no-index --find-links "$PEER_WHEELS" torchdiffeq flow_matching \
    || echo "peer wheels not installed: peers are left out"
fi
$PY bench/bench_peers.py --device cuda --config gpu --out "$OUT/peers_cuda.json" 2>&1 | tail -60 \
  || status=1

step "end to end: D-Flow problems per hour, batched vs the per-image loop (Fashion-MNIST)"
$PY bench/bench_e2e.py --device cuda --out "$OUT/e2e_cuda.json" 2>&1 | tail -25 || status=1

step "benchmark suite: gpu cases (pytest-benchmark JSON)"
$PY -m pytest bench/test_bench_suite.py bench/test_bench_smoke.py -q -p no:cacheprovider -m gpu \
    --benchmark-json="$OUT/suite_gpu.json" 2>&1 | tail -15 || status=1

step "summary"
tail -3 "$OUT/parity.txt"
[ -f "$OUT/kernels_cuda.md" ] && head -40 "$OUT/kernels_cuda.md"
exit $status
