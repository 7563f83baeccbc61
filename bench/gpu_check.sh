#!/usr/bin/env bash
# The one script run on a GPU machine: (build and) check the installed scrimp, run every CUDA test and
# every GPU benchmark, each step bounded by a timeout inside one overall deadline, so one short device
# call brings back every result.
#
#   GPU_CHECK_BUDGET_S   overall deadline in seconds (default 480); a step gets at most what is left
#   SCRIMP_SKIP_BUILD=1  use the scrimp already installed in this Python (a wheel): no build step
#   GPU_CHECK_REQUIRE_CUDA=0  go on without a usable CUDA backend (a dry run of the script itself)
#   OUT                  where the results go (default /tmp/scrimp_gpu_out); at most 8 files:
#     summary.txt            machine, build info, and every step with its exit status and seconds
#     build.log              the CUDA build (absent with SCRIMP_SKIP_BUILD=1)
#     pytest.log             every CUDA test (tests/python -k "cuda or gpu")
#     cuda_test_errors.tsv   measured max errors of the CUDA tests against the CPU / float64 references
#     bench.txt              every GPU benchmark table, one section per benchmark
#     bench.json             every benchmark's JSON, keyed by benchmark name
# Exit status: 0 when every step passed; else the first failing step's status (124: it timed out).
set -uo pipefail

OUT=${OUT:-/tmp/scrimp_gpu_out}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEADLINE=$(( $(date +%s) + BUDGET ))
SUMMARY="$OUT/summary.txt"
BENCH_JSON_DIR=$(mktemp -d)
: > "$SUMMARY"
: > "$OUT/bench.txt"
first_rc=0

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME MAX_SECONDS LOG COMMAND...: runs COMMAND (appending its output to LOG) under
# min(MAX_SECONDS, time left before the deadline - 5 s); records status and duration in the summary.
step() {
  local name=$1 max=$2 log=$3; shift 3
  local left=$(( DEADLINE - $(date +%s) - 5 ))
  local limit=$(( max < left ? max : left ))
  if [ "$limit" -lt 5 ]; then
    note "step $name: SKIPPED (deadline reached)"
    [ "$first_rc" -ne 0 ] || first_rc=124
    return 124
  fi
  local t0=$(date +%s) rc
  echo "== $name (limit ${limit}s) ==" >> "$log"
  timeout --kill-after=5 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  note "step $name: rc=$rc in $(( $(date +%s) - t0 ))s (limit ${limit}s)$([ $rc -eq 124 ] && echo ' TIMED OUT')"
  [ "$rc" -eq 0 ] || [ "$first_rc" -ne 0 ] || first_rc=$rc
  return $rc
}

note "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) budget ${BUDGET}s"
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"; } 2>&1 \
  | sed 's/^/gpu: /' | tee -a "$SUMMARY"

# ---- build (skipped with SCRIMP_SKIP_BUILD=1) ----------------------------------------------------------
if [ "${SCRIMP_SKIP_BUILD:-0}" != 1 ]; then
  # CUTLASS / CuTe headers for the tensor-core clustering kernel. The device machine has no network:
  # carry the wheel (pip download --no-deps nvidia-cutlass -d .carry; run with carry [".carry"]).
  if [ -z "${SCRIMP_CUTLASS_DIR:-}" ]; then
    whl=$(ls .carry/nvidia_cutlass-*.whl 2>/dev/null | head -n 1 || true)
    if [ -n "$whl" ]; then
      rm -rf /tmp/scrimp_cutlass && "$PY" -m zipfile -e "$whl" /tmp/scrimp_cutlass
      export SCRIMP_CUTLASS_DIR=/tmp/scrimp_cutlass/cutlass_library/source/include
    fi
  fi
  note "CUTLASS headers: ${SCRIMP_CUTLASS_DIR:-none (plain CUDA clustering kernel)}"
  step build 360 "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps -v . || {
    tail -n 40 "$OUT/build.log"
    note "gpu_check: build failed"
    exit 1
  }
fi

# ---- the installed scrimp (imported from outside the source tree) -------------------------------------
step build_info 60 "$SUMMARY" bash -c "cd /tmp && \"$PY\" -c '
import scrimp, torch
info = scrimp.build_info()
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda)
print(\"scrimp\", scrimp.__file__)
print(info)
assert info[\"cuda_compiled\"], \"scrimp was built without CUDA\"
assert info[\"cuda_device_usable\"], \"no usable CUDA device: \" + info[\"cuda_status\"]
'" || {
  note "gpu_check: the installed scrimp has no usable CUDA backend"
  [ "${GPU_CHECK_REQUIRE_CUDA:-1}" = 0 ] || exit 1
}

# ---- every CUDA test -------------------------------------------------------------------------------
export SCRIMP_CUDA_ERRLOG="$OUT/cuda_test_errors.tsv"
rm -f "$SCRIMP_CUDA_ERRLOG"
step cuda_tests 240 "$OUT/pytest.log" "$PY" -m pytest -q -rs -p no:cacheprovider tests/python -k "cuda or gpu"
grep -E "passed|failed|error" "$OUT/pytest.log" | tail -n 1 | sed 's/^/pytest: /' | tee -a "$SUMMARY"

# ---- every GPU benchmark (most important first; each bounded) ------------------------------------------
bench() {  # name max_seconds args...
  local name=$1 max=$2; shift 2
  echo "######## $name" >> "$OUT/bench.txt"
  step "bench_$name" "$max" "$OUT/bench.txt" "$PY" "bench/bench_$name.py" "$@" --json "$BENCH_JSON_DIR/$name.json"
}
bench scoring 60 --device cuda
bench tip 60 --device cuda --kl-n 4096 --kl-v 151936 --dtypes bfloat16
bench packets 60 --device cuda --skip-method
bench icecache_gpu 60 --device cuda
bench icecache_decode 240 --device cuda --lengths 32768 131072 --steps 16
bench icecache_e2e 120 --lengths 32768
# KV Packet inside vLLM (GPU KV layout), only where vLLM is installed
if "$PY" -c "import vllm" >/dev/null 2>&1; then
  bench vllm_packets 150 --requests 60
else
  note "bench_vllm_packets: skipped (vllm not importable)"
fi

"$PY" - "$BENCH_JSON_DIR" "$OUT/bench.json" <<'PY' || true
import json, os, sys
src, dst = sys.argv[1], sys.argv[2]
out = {}
for f in sorted(os.listdir(src)):
    try:
        with open(os.path.join(src, f)) as fh:
            out[f[:-5]] = json.load(fh)
    except (OSError, ValueError) as e:
        out[f[:-5]] = {"error": str(e)}
with open(dst, "w") as fh:
    json.dump(out, fh, indent=1)
PY
rm -rf "$BENCH_JSON_DIR"

if [ "$first_rc" -ne 0 ]; then
  note "gpu_check: a step failed (first status $first_rc); results in $OUT"
  exit "$first_rc"
fi
note "gpu_check: all done, results in $OUT"
