"""The Python, torch, transformers and trl versions scrimp is tested with, and the check that refuses others.

:data:`SUPPORTED` holds, per package, the half-open range ``[lowest, cap)`` of release numbers that CI
tests at both ends (``tests/run.sh``: the newest versions in one environment, the lowest ones beside
vLLM's CPU build in another); ``pyproject.toml`` declares the same ranges (``tests/python/test_versions.py``
checks they agree). ``import scrimp`` calls :func:`check` for Python, torch and transformers; the TRL
integration calls :func:`require` for ``trl`` before it imports it. A version outside its range raises
:class:`VersionError` naming the installed and the required version, instead of failing later deep
inside the dependency. ``SCRIMP_ALLOW_UNTESTED_VERSIONS=1`` turns the check off (to try a new release
before the ranges are raised).

Release numbers only are compared: ``2.13.0+cpu`` is 2.13.0, and a pre-release of a capped version
(``5.26.0.dev0``) counts as that version.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Dict, Optional, Tuple

__all__ = ["SUPPORTED", "VersionError", "check", "require", "installed_version", "specifier"]

#: package -> (lowest tested version, first version not admitted)
SUPPORTED: Dict[str, Tuple[str, str]] = {
    "python": ("3.11", "3.12"),
    "torch": ("2.13", "2.14"),
    "transformers": ("5.16.1", "5.26"),
    "trl": ("1.16", "1.17"),
}

#: what ``import scrimp`` checks (trl is optional: checked where it is used)
CHECKED_AT_IMPORT = ("python", "torch", "transformers")

ALLOW_ENV = "SCRIMP_ALLOW_UNTESTED_VERSIONS"


class VersionError(ImportError):
    """An installed Python or package version outside the range scrimp is tested with."""


def _release(v: str) -> Tuple[int, ...]:
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", v)
    if not m:
        raise ValueError(f"cannot read a release number from version {v!r}")
    parts = [int(x) for x in m.group(1).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def specifier(name: str) -> str:
    """The pip requirement range of ``name``, e.g. ``">=2.13,<2.14"``."""
    lo, hi = SUPPORTED[name]
    return f">={lo},<{hi}"


def installed_version(name: str) -> Optional[str]:
    """The installed version of ``name`` (``"python"``: the running interpreter); None when not installed."""
    if name == "python":
        return ".".join(str(x) for x in sys.version_info[:3])
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _admitted(name: str, version: str) -> bool:
    lo, hi = SUPPORTED[name]
    return _release(lo) <= _release(version) < _release(hi)


def require(name: str, feature: Optional[str] = None) -> Optional[str]:
    """Raise :class:`VersionError` when the installed ``name`` is outside :data:`SUPPORTED`.

    Returns the installed version (None when ``name`` is not installed: the import that needs it
    reports that). ``feature`` names what needs it in the message."""
    have = installed_version(name)
    if have is None or os.environ.get(ALLOW_ENV, "") not in ("", "0") or _admitted(name, have):
        return have
    what = f"{feature} needs" if feature else "scrimp needs"
    label = "Python" if name == "python" else name
    fix = ("use a Python 3.11 interpreter" if name == "python"
           else f"pip install '{name}{specifier(name)}'")
    raise VersionError(
        f"{what} {label} {specifier(name)} (the versions it is tested with); {label} {have} is installed. "
        f"Install a tested version ({fix}), or set {ALLOW_ENV}=1 to run untested")


def check() -> None:
    """Check Python, torch and transformers (what ``import scrimp`` runs)."""
    for name in CHECKED_AT_IMPORT:
        require(name)
