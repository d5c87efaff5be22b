"""Every module imports on its own; features/ imports no I/O library."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import features
import recsvc

MODULES = sorted(
    [f"features.{m.name}" for m in pkgutil.iter_modules(features.__path__)]
    + [f"recsvc.{m.name}" for m in pkgutil.iter_modules(recsvc.__path__) if m.name != "__main__"]
)
FORBIDDEN_IN_FEATURES = ("aiohttp", "redis", "recsvc", "lightgbm")


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("features.")])
def test_features_stay_pure(module: str) -> None:
    allowed = ("lightgbm",) if module == "features.trainer" else ()
    code = (
        f"import sys, {module}\n"
        f"bad = [m for m in {FORBIDDEN_IN_FEATURES!r}"
        f" if m in sys.modules and m not in {allowed!r}]\n"
        "print(','.join(bad))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip() == "", f"{module} pulls in {proc.stdout.strip()}"
