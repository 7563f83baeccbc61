#!/usr/bin/env bash
# The one script run on a GPU machine: build + install scrimp with CUDA, run every test (CUDA ones
# included), then the token-scoring benchmark. Results land in $OUT:
#   build.log, build_info.txt, pytest.log, cuda_test_errors.tsv (measured max errors of the CUDA
#   tests), bench_scoring.txt, bench_scoring.json, bench_tip.txt, bench_tip.json,
#   bench_packets.{txt,json}, nvidia-smi.txt
set -euo pipefail

OUT=${OUT:-/tmp/scrimp_gpu_out}
mkdir -p "$OUT"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

{ nvidia-smi || true; } > "$OUT/nvidia-smi.txt" 2>&1
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' | tee "$OUT/build_info.txt"

# CUTLASS / CuTe headers for the tensor-core clustering kernel. The device machine has no network:
# carry the wheel (pip download --no-deps nvidia-cutlass -d .carry; run with carry [".carry"]).
if [ -z "${SCRIMP_CUTLASS_DIR:-}" ]; then
  whl=$(ls .carry/nvidia_cutlass-*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$whl" ]; then
    rm -rf /tmp/scrimp_cutlass && python3 -m zipfile -e "$whl" /tmp/scrimp_cutlass
    export SCRIMP_CUTLASS_DIR=/tmp/scrimp_cutlass/cutlass_library/source/include
  else
    SCRIMP_CUTLASS_DIR=$(python3 -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))' 2>/dev/null || true)
    export SCRIMP_CUTLASS_DIR
  fi
fi
echo "CUTLASS headers: ${SCRIMP_CUTLASS_DIR:-none (plain CUDA clustering kernel)}" | tee -a "$OUT/build_info.txt"

echo "== build (pip install, nvcc via CMake) =="
python3 -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1 || {
  tail -n 60 "$OUT/build.log"
  echo "gpu_check: build failed (full log: $OUT/build.log)" >&2
  exit 1
}
grep -E "scrimp: CUDA backend|scrimp: CUTLASS|ptxas|warning" "$OUT/build.log" | tail -n 20 || true

# Run from outside the source tree so the installed package (with _C) is the one imported.
python3 - <<'PY' 2>&1 | tee -a "$OUT/build_info.txt"
import os, sys
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.getcwd()]
import scrimp
info = scrimp.build_info()
print(info)
assert info["cuda_compiled"], "scrimp was built without CUDA"
assert info["cuda_device_usable"], f"no usable CUDA device: {info['cuda_status']}"
PY

echo "== tests =="
export SCRIMP_CUDA_ERRLOG="$OUT/cuda_test_errors.tsv"
rm -f "$SCRIMP_CUDA_ERRLOG"
set +e
python3 -m pytest -q -rs tests/python 2>&1 | tee "$OUT/pytest.log"
test_rc=${PIPESTATUS[0]}
set -e

echo "== benchmark =="
python3 bench/bench_scoring.py --device cuda --json "$OUT/bench_scoring.json" 2>&1 | tee "$OUT/bench_scoring.txt"
python3 bench/bench_tip.py --device cuda --kl-n 4096 --kl-v 151936 --dtypes bfloat16 --json "$OUT/bench_tip.json" 2>&1 | tee "$OUT/bench_tip.txt"
python3 bench/bench_packets.py --device cuda --skip-method --json "$OUT/bench_packets.json" 2>&1 | tee "$OUT/bench_packets.txt"
python3 bench/bench_icecache_gpu.py --device cuda --json "$OUT/bench_icecache_gpu.json" 2>&1 | tee "$OUT/bench_icecache_gpu.txt"
python3 bench/bench_icecache_e2e.py --lengths 32768 --json "$OUT/bench_icecache_e2e.json" 2>&1 | tee "$OUT/bench_icecache_e2e.txt"

if [ "$test_rc" -ne 0 ]; then
  echo "gpu_check: tests failed (rc=$test_rc, see $OUT/pytest.log)" >&2
  exit "$test_rc"
fi
echo "gpu_check: all done, results in $OUT"
