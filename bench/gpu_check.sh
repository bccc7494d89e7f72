#!/usr/bin/env bash
# GPU verification of dflow_fast on a CUDA machine, in stages (see bench/results/README.md).
#
#   bash bench/gpu_check.sh [STAGE ...]      # default: every stage, in this order
#
# Stages:
#   build      compile dflow_fast._C in place with the CUDA kernels against the machine's own torch
#              (offline, no venv; skipped when DFLOW_FAST_PREBUILT=1 and a _C for this Python exists)
#   parity     the parity suites of the cuda and triton backends (fp32/fp16/bf16/fp64), the cpp and
#              solve suites, the reversible/auto suites, and the CUDA-graph tests of optimize /
#              ValueAndGrad (tests/test_cuda_graphs.py: graphed == eager per scheme and backend), on
#              the GPU; diffusers models in bf16/fp16 solved in float32
#              (tests/adapters/test_low_precision.py) and a flow_matching epsilon model under CUDA
#              graphs (tests/adapters/test_flow_matching.py): carry diffusers' and flow_matching's
#              wheels in PEER_WHEELS
#   gate       the parity gate on parity.xml (bench/parity_gate.py, as .github/workflows/gpu.yml runs
#              it): fails unless a GPU is visible, the CUDA backend built, nothing failed, no
#              cuda/triton test skipped, and every cuda/triton test the parity files define passed
#   kernels    kernel microbenchmarks (bandwidth vs a copy, speedup vs eager PyTorch)
#   gradient   one gradient through the 35M-parameter 64x64 U-Net: every mode and backend of
#              dflow_fast (backprop, adjoint per backend, auto, reversible) against the reference,
#              torchdiffeq, flow_matching and torch.utils.checkpoint (bench.bench_peers)
#   budget     gradient="auto" across memory budgets (bench.bench_budget)
#   drift      reversible reconstruction drift in fp32/bf16 on CUDA
#   e2e        D-Flow problems per hour, batched vs the per-image loop (Fashion-MNIST)
#   fastpath   issue 16: problems per hour of the per-image loop, eager and cuda_graphs=True (256
#              problems per task), batch-1 latency eager vs graphed, bf16 vs fp32 adjoint gradient
#              of a ~100M-parameter DiT (bench.bench_fastpath -> $RESULTS/fastpath_cuda.*);
#              FASTPATH_ARGS; about 4 minutes on an H200
#   autocast   issue 15: bf16/fp16 autocast accuracy per scheme and task on CUDA (bench.bench_autocast
#              -> $RESULTS/autocast_cuda.*); AUTOCAST_ARGS (default --n 8 --max-iter 20)
#   lbfgs      issue 15: host reads per L-BFGS iteration and their wall time on CUDA, before vs
#              after (bench.bench_lbfgs_sync); no git on the device: LBFGS_BEFORE_FILE=the 'before'
#              lbfgs.py (prepare it with `git show <rev>:dflow_fast/optim/lbfgs.py > FILE` in an
#              untracked, non-ignored path so that it travels with the tree)
#   runner     issue 14: `dflow-fast run` on CUDA, 1 .. #GPUs workers (NCCL from 2 GPUs on; one GPU
#              runs the single-worker CUDA path), results identical across worker counts
#              (bench.bench_jobs -> $RESULTS/jobs_cuda.*); JOBS_ARGS
#   suite      the pytest-benchmark suite's gpu cases
#   profile    where one gradient's time goes per method (torch.profiler: device busy/idle,
#              launches, syncs, mallocs; bench.profile_gradient); PROFILE_ARGS
#   demo       the Fashion-MNIST demo (dflow-fast demo) on the GPU; DEMO_ARGS e.g. "--n 16 --dtype
#              float64 --tasks inpaint_box"; report and pictures in $RESULTS/demo
#
# Results (JSON, Markdown, PNG, logs) go to $RESULTS (default bench/results/gpu); when $OUT is set
# (the device tool) everything is packed into $OUT/gpu_results.tgz and the built extension is
# copied to $OUT so that a later call can carry it (DFLOW_FAST_PREBUILT=1). Offline extras:
# PEER_WHEELS=folder of wheels (torchdiffeq, flow_matching, diffusers), DFLOW_FAST_FASHION_MNIST_DIR=data.
# Extra arguments per stage: GRADIENT_ARGS (and GRADIENT_NAME for the file), BUDGET_ARGS, E2E_ARGS;
# PROFILE_ARGS, DEMO_ARGS, FASTPATH_ARGS, AUTOCAST_ARGS, JOBS_ARGS; time limits GRADIENT_LIMIT, E2E_LIMIT, DEMO_LIMIT,
# FASTPATH_LIMIT (seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-bench/results/gpu}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build parity gate kernels gradient budget drift e2e fastpath suite
                                   profile)
status=0
summary=()
step() { echo; echo "== $* ($(date +%T))"; }
record() { summary+=("$(printf '%-9s %-6s %5ss' "$1" "$2" "$3")"); }
last_rc=0
run_stage() {  # name, seconds limit: the stage's function in a child bash, under timeout
  local name=$1 limit=$2
  step "$name"
  local t0=$SECONDS
  timeout "$limit" bash -c "$name"; last_rc=$?
  if [ $last_rc = 0 ]; then record "$name" ok $((SECONDS - t0))
  else status=1; record "$name" "rc=$last_rc" $((SECONDS - t0)); fi
}

# Import the source tree directly: the in-place build puts _C next to the sources, and the Triton
# kernels (installed as dflow_fast.kernels by pip) are linked in.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -e dflow_fast/kernels ] || ln -s ../kernels dflow_fast/kernels
if [ -n "${PEER_WHEELS:-}" ]; then
  $PY -m pip install -q --no-deps --no-index --target /tmp/peers "$PEER_WHEELS"/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/peers" || echo "peer wheels not installed"
fi

build() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS/nvidia-smi.txt"
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  local so
  so=$($PY -c "import sysconfig; print('dflow_fast/_C' + sysconfig.get_config_var('EXT_SUFFIX'))")
  if [ "${DFLOW_FAST_PREBUILT:-0}" = 1 ] && [ -f "$so" ]; then
    echo "using the prebuilt $so"
  else
    rm -f "$so"
    DFLOW_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace >"$RESULTS/build.log" 2>&1 \
      || { tail -40 "$RESULTS/build.log"; echo "BUILD FAILED"; return 1; }
  fi
  # The C++ runtime must be torch's shared one (csrc/flags.txt says why); show what was linked.
  echo "NEEDED: $(readelf -d "$so" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
  readelf -d "$so" | grep -q 'libstdc++' || echo "WARNING: $so has a static copy of libstdc++"
  $PY -c "import json, dflow_fast; print(json.dumps(dflow_fast.build_info(), indent=1))" \
    | tee "$RESULTS/build_info.json"
  $PY -c "import dflow_fast.ops.ext as e, sys; sys.exit(0 if e.has_cuda() else 1)" \
    || { echo "dflow_fast._C has no CUDA kernels"; return 1; }
  if [ -n "$OUT" ]; then cp "$so" "$OUT/"; fi
}
parity() {
  set -o pipefail
  $PY -m pytest tests/ops/test_parity.py tests/ops/test_extension.py \
      tests/test_solve.py tests/test_cond.py tests/gradients tests/test_cuda_graphs.py \
      tests/adapters/test_low_precision.py tests/adapters/test_flow_matching.py \
      -q -p no:cacheprovider --maxfail=10 -rsx --junitxml="$RESULTS/parity.xml" 2>&1 \
      | tee "$RESULTS/parity.txt" | tail -30
}
gate() {
  $PY -m bench.parity_gate --junit "$RESULTS/parity.xml" --require-cuda --expect-collect \
      "tests/ops/test_parity.py tests/ops/test_extension.py tests/test_solve.py tests/test_cond.py tests/gradients tests/test_cuda_graphs.py tests/adapters/test_low_precision.py tests/adapters/test_flow_matching.py -k 'cuda or triton'"
}
kernels() {
  set -o pipefail
  $PY -m bench.bench_kernels --device cuda --out "$RESULTS/kernels_cuda.json" 2>&1 | tail -60
}
# One gradient through the 35M-parameter 64x64 U-Net: every mode and backend of dflow_fast and the
# peers (bench.bench_peers presets: batch 1 8 32, steps 5 10 20 40); GRADIENT_ARGS override them.
gradient() {
  set -o pipefail
  $PY -m bench.bench_peers --device cuda --config gpu --out "$RESULTS/${GRADIENT_NAME:-peers_cuda}.json" \
      ${GRADIENT_ARGS:-} 2>&1 | tail -60
}
budget() {
  set -o pipefail
  $PY -m bench.bench_budget --device cuda --out "$RESULTS/budget_cuda.json" ${BUDGET_ARGS:-} 2>&1 | tail -30
}
drift() {
  set -o pipefail
  $PY -m bench.bench_reversible --device cuda --sections drift --drift-dtypes float32 bfloat16 \
      --out "$RESULTS/reversible_cuda.json" 2>&1 | tail -30
}
e2e() {
  set -o pipefail
  $PY -m bench.bench_e2e --device cuda --out "$RESULTS/e2e_cuda.json" ${E2E_ARGS:-} 2>&1 | tail -25
}
autocast() {
  set -o pipefail
  $PY -m bench.bench_autocast --device cuda --out "$RESULTS/autocast_cuda.json" \
      ${AUTOCAST_ARGS:---n 8 --max-iter 20} 2>&1 | tail -40
}
lbfgs() {
  set -o pipefail
  $PY -m bench.bench_lbfgs_sync --device cuda --out "$RESULTS/lbfgs_sync_cuda.json" \
      ${LBFGS_BEFORE_FILE:+--before-file "$LBFGS_BEFORE_FILE"} 2>&1 | tail -30
}
runner() {
  set -o pipefail
  $PY -m bench.bench_jobs --device cuda --out "$RESULTS/jobs_cuda.json" ${JOBS_ARGS:-} 2>&1 \
      | tail -25
}
fastpath() {
  set -o pipefail
  $PY -m bench.bench_fastpath --device cuda --out "$RESULTS/fastpath_cuda.json" ${FASTPATH_ARGS:-} \
      2>&1 | tail -45
}
suite() {
  set -o pipefail
  $PY -m pytest bench/test_bench_suite.py bench/test_bench_smoke.py -q -p no:cacheprovider -m gpu \
      --benchmark-json="$RESULTS/suite_gpu.json" 2>&1 | tail -15
}
profile() {
  set -o pipefail
  $PY -m bench.profile_gradient --device cuda --out "$RESULTS/profile_cuda.json" ${PROFILE_ARGS:-} \
      2>&1 | grep -v '^USDT' | tail -30
}
demo() {  # tqdm's bar goes to the log; the report is rewritten after every task
  $PY -m dflow_fast.apps.cli demo --device cuda --out "$RESULTS/demo" ${DEMO_ARGS:-} \
      >"$RESULTS/demo.log" 2>&1; local rc=$?
  tr '\r' '\n' <"$RESULTS/demo.log" | grep -v '^ *$' | tail -4
  cat "$RESULTS/demo/report.md" 2>/dev/null
  return $rc
}

declare -A LIMIT=([build]=420 [parity]=420 [gate]=300 [kernels]=240 [gradient]=${GRADIENT_LIMIT:-540}
                  [budget]=300 [drift]=240 [e2e]=${E2E_LIMIT:-540} [suite]=300
                  [profile]=240 [demo]=${DEMO_LIMIT:-540} [fastpath]=${FASTPATH_LIMIT:-330}
                  [autocast]=240 [lbfgs]=240 [runner]=240)
export RESULTS PY OUT=${OUT:-}
export -f build parity gate kernels gradient budget drift e2e fastpath suite profile demo \
  autocast lbfgs runner
for s in "${STAGES[@]}"; do
  [ -n "${LIMIT[$s]:-}" ] || { echo "unknown stage $s"; exit 2; }
  run_stage "$s" "${LIMIT[$s]}"
  if [ "$s" = build ] && [ $last_rc != 0 ]; then break; fi  # nothing else can run
done

step "summary"
printf '%s\n' "${summary[@]}" | tee "$RESULTS/summary.txt"
[ -f "$RESULTS/parity.txt" ] && tail -3 "$RESULTS/parity.txt"
if [ -n "$OUT" ] && [ "$RESULTS" != "$OUT" ]; then
  tar czf "$OUT/gpu_results.tgz" -C "$RESULTS" . && echo "packed $RESULTS into \$OUT/gpu_results.tgz"
fi
exit $status
