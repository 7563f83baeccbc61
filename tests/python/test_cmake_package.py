"""The installed package carries the C++ core for C/C++ consumers: scrimp.cmake_dir() is a CMake
prefix holding scrimpConfig.cmake, and the C++ server example (examples/embed) and the C ABI test
(examples/c) build against it and run green. Skipped only when cmake or a C/C++ compiler is missing."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import scrimp

ROOT = Path(__file__).resolve().parents[2]
TOOLS = all(shutil.which(t) for t in ("cmake", "cc", "c++"))


def test_cmake_dir_holds_the_package_config():
    d = Path(scrimp.cmake_dir())
    assert (d / "scrimp" / "scrimpConfig.cmake").is_file()
    pkg = d.parent.parent
    assert (pkg / "include" / "scrimp" / "scrimp.h").is_file()
    assert (pkg / "include" / "scrimp" / "packet_store.h").is_file()
    assert any(p.name.startswith("libscrimp") for p in (pkg / "lib").iterdir())


@pytest.mark.skipif(not TOOLS, reason="needs cmake and a C/C++ compiler")
@pytest.mark.parametrize("example, program", [("embed", "embed_server"), ("c", "scrimp_c_test")])
def test_example_builds_and_runs_against_the_installed_package(tmp_path, example, program):
    build = tmp_path / "build"
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL="2")
    subprocess.run(["cmake", "-S", str(ROOT / "examples" / example), "-B", str(build),
                    f"-DCMAKE_PREFIX_PATH={scrimp.cmake_dir()}"], check=True, capture_output=True, env=env)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True, env=env)
    run = subprocess.run([str(build / program), str(tmp_path / "packets")], capture_output=True, text=True,
                         timeout=300, env=dict(env, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout
