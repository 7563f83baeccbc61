#!/usr/bin/env bash
# Hardening runs over the C++ core (CI runs this after tests/run.sh; needs cmake, libgtest-dev, clang):
#   1. the whole C++ suite under AddressSanitizer + UndefinedBehaviorSanitizer (gcc);
#   2. the packet-store tests (concurrency stress and 8 x 10k exact accounting) under ThreadSanitizer;
#   3. coverage-guided fuzzing for a bounded time: libFuzzer over the packet file format (clang), atheris
#      over the Python-side readers (adapter files, TESSY JSONL resume, a store reopening a directory).
# Every sanitizer finding is fatal (-fno-sanitize-recover=all, halt_on_error), so a clean exit means zero
# reports. FUZZ_SECONDS (default 60) bounds each fuzz target. Summary: build/hardening/summary.txt.
#   bash tests/hardening.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
OUT=build/hardening
mkdir -p "$OUT"
: > "$OUT/summary.txt"
note() { echo "$*" | tee -a "$OUT/summary.txt"; }

san_build() {  # dir, sanitizers, extra cmake args...
  local dir=$1 san=$2; shift 2
  cmake -S . -B "$dir" -DSCRIMP_CUDA=OFF -DSCRIMP_BUILD_TESTS=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DSCRIMP_SANITIZE="$san" "$@" > "$dir.configure.log"
  cmake --build "$dir" -j "${JOBS:-2}" > "$dir.build.log"
}

# 1. ASan + UBSan, every C++ test
san_build build/asan address,undefined
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
(cd build/asan && ctest --output-on-failure > ../hardening/asan-ctest.log 2>&1) || { tail -80 "$OUT/asan-ctest.log"; exit 1; }
note "asan+ubsan: $(grep -E 'tests passed' "$OUT/asan-ctest.log")"

# 2. TSan, the packet store's concurrent tests (OpenMP kernels excluded: libgomp is not instrumented)
san_build build/tsan thread
TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 build/tsan/scrimp_tests --gtest_filter='PacketStore*' \
  > "$OUT/tsan.log" 2>&1 || { tail -80 "$OUT/tsan.log"; exit 1; }
note "tsan: $(grep -E '^\[  PASSED  \]' "$OUT/tsan.log") (packet store, incl. 8 threads x 10k ops)"

# 3a. libFuzzer over the packet file format
CLANGXX=${CLANGXX:-$(command -v clang++ || command -v clang++-14 || true)}
if [ -z "$CLANGXX" ]; then echo "clang++ not found (apt-get install clang libclang-rt-dev)"; exit 1; fi
cmake -S . -B build/fuzz -DCMAKE_CXX_COMPILER="$CLANGXX" -DSCRIMP_CUDA=OFF -DSCRIMP_FUZZ=ON \
      -DSCRIMP_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo > build/fuzz.configure.log
cmake --build build/fuzz -j "${JOBS:-2}" --target fuzz_packet_file > build/fuzz.build.log
work=$(mktemp -d)
cp fuzz/corpus/packet_file/* "$work/"
build/fuzz/fuzz_packet_file "$work" -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 \
  -artifact_prefix="$OUT/packet_file-" > "$OUT/fuzz-packet_file.log" 2>&1 || { tail -60 "$OUT/fuzz-packet_file.log"; exit 1; }
note "libFuzzer packet_file: $(grep -E 'stat::number_of_executed_units' "$OUT/fuzz-packet_file.log" | awk '{print $2}') executions in ${FUZZ_SECONDS}s, corpus $(ls fuzz/corpus/packet_file | wc -l) -> $(ls "$work" | wc -l) inputs, 0 findings"

# 3b. atheris over the Python readers (the installed scrimp package)
"$PY" -m pip install -q atheris
for target in adapter_file tessy_jsonl packet_dir; do
  "$PY" fuzz/run_python_fuzz.py "$target" --seconds "$FUZZ_SECONDS" --artifacts "$OUT" > "$OUT/fuzz-$target.log" 2>&1 \
    || { tail -60 "$OUT/fuzz-$target.log"; exit 1; }
  note "atheris $target: $(grep -E 'stat::number_of_executed_units' "$OUT/fuzz-$target.log" | awk '{print $2}') executions in ${FUZZ_SECONDS}s, 0 findings"
done
cat "$OUT/summary.txt"
