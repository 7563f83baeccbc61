#!/usr/bin/env bash
# Installs scrimp with its test dependencies into the active Python environment, then runs every
# test: the C++ suite (ctest), the C++ server example and the C ABI test against the *installed* C++
# library and against the copy inside the installed Python package, pytest.
# A suite that cannot run is a failure, never a silent skip: GoogleTest is installed with apt-get when
# missing (as root or through sudo), otherwise the run stops and says what to install.
#   bash tests/run.sh            (README: the newcomer's test command)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
JOBS=${JOBS:-2}

die() { echo "tests/run.sh: $*" >&2; exit 1; }

# ---- what the C++ suite needs: cmake, a C++ compiler, GoogleTest -----------------------------------
have_gtest() {
  [ -f /usr/include/gtest/gtest.h ] || [ -f /usr/local/include/gtest/gtest.h ] || [ -n "${GTEST_ROOT:-}" ]
}
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v c++ >/dev/null || command -v g++ >/dev/null || missing+=(g++)
have_gtest || missing+=(libgtest-dev)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
  if [ "$SUDO" != none ] && command -v apt-get >/dev/null; then
    echo "tests/run.sh: installing ${missing[*]} (apt-get)"
    $SUDO apt-get update
    $SUDO apt-get install -y "${missing[@]}"
  else
    die "the C++ suite needs ${missing[*]}; install them (Debian/Ubuntu: apt-get install ${missing[*]}; or set GTEST_ROOT to a GoogleTest install) and rerun"
  fi
  have_gtest || die "GoogleTest is still missing after installing libgtest-dev"
fi

# CUTLASS / CuTe headers (header-only; the wheel's dependencies are not needed) for the tensor-core
# clustering kernel; the CUDA build works without them (plain kernel), so a failed download is no error.
if command -v nvcc >/dev/null && [ -z "${SCRIMP_CUTLASS_DIR:-}" ]; then
  "$PY" -m pip install --no-deps nvidia-cutlass || echo "nvidia-cutlass not installed: CUDA build without CUTLASS"
  SCRIMP_CUTLASS_DIR=$("$PY" -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))' 2>/dev/null || true)
  export SCRIMP_CUTLASS_DIR
fi

"$PY" -m pip install torch==2.13.0 ".[test]"

# ---- C++ core without Python: build (CUDA when nvcc is found), ctest, install --------------------
# SCRIMP_REQUIRE_TESTS makes a missing GoogleTest a configure error; ctest treats "no tests" as one.
cmake -S . -B build/ctest -DSCRIMP_CUDA=AUTO -DSCRIMP_BUILD_TESTS=ON -DSCRIMP_REQUIRE_TESTS=ON \
      -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$PWD/build/ctest-install"
cmake --build build/ctest -j "$JOBS"
(cd build/ctest && ctest --output-on-failure --no-tests=error)
cmake --install build/ctest

# ---- consumers of the installed library: the C++ server example and the C ABI test -------------------
# Built twice: against the install prefix above, and against the copy inside the installed Python
# package (scrimp.cmake_dir()), so a server links the exact core its Python side uses.
consumers() {  # tag, CMAKE_PREFIX_PATH
  cmake -S examples/embed -B "build/embed-$1" -DCMAKE_PREFIX_PATH="$2"
  cmake --build "build/embed-$1" -j "$JOBS"
  "./build/embed-$1/embed_server"
  cmake -S examples/c -B "build/c-example-$1" -DCMAKE_PREFIX_PATH="$2"
  cmake --build "build/c-example-$1" -j "$JOBS"
  "./build/c-example-$1/scrimp_c_test"
}
consumers install "$PWD/build/ctest-install"
consumers wheel "$(cd /tmp && "$PY" -c 'import scrimp; print(scrimp.cmake_dir())')"

# ---- Python API (the installed wheel, not the source tree) -----------------------------------------
"$PY" -m pytest -q tests/python
