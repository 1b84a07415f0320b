#!/usr/bin/env bash
# The GPU checks in one command. See benchmarks/README.md, "GPU check".
#
#   bash benchmarks/gpu_check.sh                  # kernels: a CUDA GPU with torch + triton
#   bash benchmarks/gpu_check.sh e2e              # a CUDA GPU where vLLM and batchrun install
#   bash benchmarks/gpu_check.sh smoke            # CPU: the kernels mode's steps, tiny, in
#                                                 #   Triton's interpreter (checks this script)
#   bash benchmarks/gpu_check.sh MODE --dry-run   # print the steps and check the tools only
#   options: --out DIR (logs and results; default build/gpu-check), --budget SECONDS (default
#   450 for kernels and smoke, 5400 for e2e); E2E_ARGS="--jobs rag,unshared --rounds 2" adds
#   arguments to the e2e benchmark, KV_CACHE its KV cache size (default 256MiB)
#
# kernels: the kernel benchmark (benchmarks/kernels/) on the target shape (batch 512, 4k
#   shared prefix), tests/kernels compiled on the GPU, then the benchmark's default sweep
#   while the budget (default 450 s, under 8 minutes in all) lasts; prints each shape's
#   faster shared kernel with its ratios to per-sequence attention and its % of the HBM
#   roofline, and the targets (>= 10x, >= 70%). Needs no vLLM, no network and no install:
#   kernels/ is imported as batchrun_kernels through a link in a temporary folder.
# e2e: the planner benchmark's jobs end to end (benchmarks/bench_planner_e2e.py) with
#   --attention default, prefix and auto, compiled, on vLLM's multi-process engine (the
#   default on GPUs, so the attention counters cross the process boundary as in production).
#
# Exit status: 0 when every step ran and every target measured was met; 1 otherwise.
set -uo pipefail

MODE=kernels
DRY=0
OUT_DIR=
BUDGET=
while [ $# -gt 0 ]; do
  case "$1" in
    kernels|e2e|smoke) MODE=$1 ;;
    --dry-run) DRY=1 ;;
    --out) OUT_DIR=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
OUT_DIR=${OUT_DIR:-$REPO/build/gpu-check}
if [ -z "$BUDGET" ]; then
  if [ "$MODE" = e2e ]; then BUDGET=5400; else BUDGET=450; fi
fi
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
DEADLINE=$((SECONDS + BUDGET))
FAILED=0
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

say() { printf '\n== %s\n' "$*"; }
left() { echo $((DEADLINE - SECONDS)); }
# run NAME CAP_SECONDS CMD...: the command under a timeout of min(CAP, time left), logged
# to $OUT_DIR/NAME.log; a failure or a timeout marks the check failed and the next step runs.
run() {
  local name=$1 cap=$2; shift 2
  local limit; limit=$(left)
  [ "$cap" -lt "$limit" ] && limit=$cap
  echo "\$ $*    # at most ${limit}s, log: $OUT_DIR/$name.log"
  if [ "$DRY" = 1 ]; then return 0; fi
  if [ "$limit" -le 5 ]; then
    echo "gpu_check: no time left for $name"; FAILED=1; return 1
  fi
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "gpu_check: $name stopped after ${limit}s (its results so far are kept)"
  fi
  [ "$rc" = 0 ] || FAILED=1
  return "$rc"
}

say "machine"
"$PY" - <<'EOF' || { echo "gpu_check: $PY cannot import torch"; exit 1; }
import platform, torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "missing"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton_version}, "
      f"{gpu}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi -L
HAS_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$MODE" != smoke ] && [ "$HAS_GPU" != 1 ] && [ "$DRY" = 0 ]; then
  echo "gpu_check: $MODE needs a CUDA GPU (smoke runs the same steps on CPU)"; exit 1
fi

if [ "$MODE" = e2e ]; then
  say "end to end: planner jobs x --attention default,prefix,auto"
  if ! "$PY" -c "import vllm, batchrun" 2>/dev/null; then
    echo "gpu_check: e2e needs vLLM and batchrun importable (pip install -e '.[gpu]');" \
         "this machine has none: run the kernels mode here"
    [ "$DRY" = 1 ] || exit 1
  fi
  # vLLM's multi-process engine, as `batchrun run` uses on GPUs; compiled, with CUDA graphs.
  VLLM_ENABLE_V1_MULTIPROCESSING=1 run e2e 100000 "$PY" benchmarks/bench_planner_e2e.py \
    --attention default,prefix,auto --no-enforce-eager --kv-cache-memory "${KV_CACHE:-256MiB}" \
    ${E2E_ARGS:-}
  exit $FAILED
fi

# kernels / smoke: batchrun_kernels is kernels/ of this checkout, through a link.
SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
ln -s "$REPO/kernels" "$SHIM/batchrun_kernels"
export PYTHONPATH="$SHIM:$REPO${PYTHONPATH:+:$PYTHONPATH}"
BENCH=(benchmarks/kernels/bench_prefix_attention.py)
TESTS=(tests/kernels -q -p no:cacheprovider)
if [ "$MODE" = smoke ]; then
  export TRITON_INTERPRET=1
  TARGET=(--smoke)
  SWEEP=()
else
  TARGET=(--batch 512 --prefix 4096 --suffix 64 512)
  SWEEP=(--batch 32 128 512 --prefix 1024 4096 16384 --suffix 64 512)
fi

# pytest-xdist (on the lent GPU machines) compiles the kernels' variants in parallel.
WORKERS=()
if "$PY" -c "import xdist" 2>/dev/null; then
  WORKERS=(-n "${GPU_CHECK_WORKERS:-8}")
fi

rm -f "$OUT_DIR/kernel_bench_target.jsonl" "$OUT_DIR/kernel_bench_sweep.jsonl"
say "kernel benchmark: the target shape"
run kernel_bench_target 150 "$PY" "${BENCH[@]}" "${TARGET[@]}" \
  --json "$OUT_DIR/kernel_bench_target.jsonl"

say "kernel tests ($MODE)"
run kernel_tests $((BUDGET * 45 / 100)) "$PY" -m pytest "${TESTS[@]}" "${WORKERS[@]}"

if [ ${#SWEEP[@]} -gt 0 ]; then
  say "kernel benchmark: the sweep, while the budget lasts"
  run kernel_bench_sweep 100000 "$PY" "${BENCH[@]}" "${SWEEP[@]}" \
    --json "$OUT_DIR/kernel_bench_sweep.jsonl"
fi

say "summary: the faster shared kernel per shape, against per-sequence attention"
if [ "$DRY" = 0 ]; then
  cat "$OUT_DIR"/kernel_bench_sweep.jsonl "$OUT_DIR"/kernel_bench_target.jsonl \
    2>/dev/null >"$OUT_DIR/kernel_bench.jsonl"
  "$PY" benchmarks/kernels/targets.py "$OUT_DIR/kernel_bench.jsonl" | tee "$OUT_DIR/summary.txt"
  rc=${PIPESTATUS[0]}
  # smoke measures no target shape (rc 2): only the script's steps are checked.
  if [ "$rc" = 1 ] || { [ "$rc" = 2 ] && [ "$MODE" != smoke ]; }; then FAILED=1; fi
  echo "results: $OUT_DIR (summary.txt, kernel_bench.jsonl, *.log)"
fi
[ "$FAILED" = 0 ] && echo "gpu_check $MODE: ok" || echo "gpu_check $MODE: FAILED (see above)"
exit $FAILED
