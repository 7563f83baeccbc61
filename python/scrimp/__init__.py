"""scrimp: cheaper LLM pipelines without making them worse.

One C++/CUDA core (``scrimp._C``) with a slim Python layer:

- :func:`token_scores` - fused per-token entropy / KL / log-prob scoring (CPU and CUDA).
- :func:`kl_loss` - fused KL / JSD distillation loss with its gradient in one pass (CPU and CUDA).
- :mod:`scrimp.tip` - TIP token-selective on-policy distillation.
- :func:`load_model` - one way to name a model: ``testbed:NAME``, a checkpoint directory or a hub id.
- :mod:`scrimp.testbed` - small real Hugging Face models and tasks every method is measured on.
"""
from __future__ import annotations

from . import _versions
from ._versions import VersionError

_versions.check()  # Python, torch and transformers inside the tested ranges, else VersionError naming both

from . import _C  # noqa: E402
from .scoring import TokenScores, token_scores
from .distill_loss import kl_loss
from . import tip
from . import tessy  # TESSY synthesis (torch/transformers are imported lazily)
from .packets import PacketStore, assemble, rerotate_keys
from .models import load_model

__version__ = _C.build_info()["version"]


def build_info() -> dict:
    """What this build contains and what this machine offers.

    Returns
    -------
    dict
        ``version``, ``cuda_compiled`` (CUDA kernels are in the binary), ``cuda_architectures``,
        ``cuda_device_usable`` (a driver and a device are present now), ``cuda_device_count``,
        ``cuda_status``, ``cpu_simd`` (the CPU kernel path: avx512 / avx2 / generic) and
        ``openmp_threads``.
    """
    return dict(_C.build_info())


def cmake_dir() -> str:
    """The directory to give CMake as ``-DCMAKE_PREFIX_PATH`` to link the C++ core of this package.

    The package carries the core as a library (``lib/libscrimp.so``), its headers (``include/scrimp``)
    and the CMake package config (``lib/cmake/scrimp``), so that a C++ (or C) program links the exact
    core the Python side uses: ``find_package(scrimp REQUIRED)`` then ``scrimp::scrimp``.

    Returns
    -------
    str
        ``<package>/lib/cmake``, which holds ``scrimp/scrimpConfig.cmake``.
    """
    import os

    return os.path.join(os.path.dirname(os.path.abspath(_C.__file__)), "lib", "cmake")


def __getattr__(name):
    # IceCache needs torch + transformers: imported on first use only.
    if name == "IceCache":
        from .icecache import IceCache

        return IceCache
    raise AttributeError(f"module 'scrimp' has no attribute {name!r}")


__all__ = ["VersionError", "TokenScores", "token_scores", "kl_loss", "tip", "tessy", "build_info", "cmake_dir", "__version__",
           "PacketStore", "rerotate_keys", "assemble", "IceCache", "load_model"]
