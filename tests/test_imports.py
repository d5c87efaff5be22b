"""Architecture: every module imports on its own, and imports only point down the
layers (features < settings, errors, ops < store < ranking, ab < service < web
< cli); aiohttp stays in web and cli, features/ imports no I/O library."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import features
import recsvc

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    [m.name for m in pkgutil.walk_packages(features.__path__, "features.")]
    + [
        m.name
        for m in pkgutil.walk_packages(recsvc.__path__, "recsvc.")
        if m.name != "recsvc.__main__"
    ]
)
FORBIDDEN_IN_FEATURES = ("aiohttp", "redis", "recsvc", "lightgbm")

# Layer of each part of the code; a module may import only its own layer or lower.
LAYERS: dict[str, int] = {
    "features": 0,
    "recsvc.settings": 1,
    "recsvc.errors": 1,
    "recsvc.keys": 1,
    "recsvc.ops": 1,
    "recsvc.store": 2,
    # URL parsing only (imports nothing of ours): settings validates the URL with it.
    "recsvc.store.redisurl": 1,
    "recsvc.ranking": 3,
    "recsvc.ab": 3,
    "recsvc.service": 4,
    "recsvc.web": 5,
    "recsvc.cli": 6,
    "recsvc.__main__": 6,
    "recsvc": 0,  # the package itself: a docstring and __version__
}
# Parts of one layer that must not import each other.
SIBLINGS_APART = {("recsvc.ranking", "recsvc.ab"), ("recsvc.ab", "recsvc.ranking")}
# Only these may import aiohttp (the server; the simulator's HTTP client).
AIOHTTP_ALLOWED = ("recsvc.web", "recsvc.cli")


def part(module: str) -> str:
    """The LAYERS key a module belongs to (the longest matching prefix)."""
    best = ""
    for key in LAYERS:
        if (module == key or module.startswith(key + ".")) and len(key) > len(best):
            best = key
    if not best:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return best


def source_of(module: str) -> Path:
    path = ROOT / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports_of(module: str) -> list[str]:
    """Every module ``module`` imports, at any depth of its code (absolute names)."""
    tree = ast.parse(source_of(module).read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # 'from recsvc.store import keys' imports recsvc.store.keys when it exists.
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append(sub if sub in MODULES else node.module)
    return found


def violations(module: str) -> list[str]:
    mine = part(module)
    bad = []
    for name in imports_of(module):
        top = name.split(".")[0]
        if top == "aiohttp" and not mine.startswith(AIOHTTP_ALLOWED):
            bad.append(f"{module} imports aiohttp")
        if top not in ("features", "recsvc") or name == "recsvc":
            continue
        theirs = part(name)
        if LAYERS[theirs] > LAYERS[mine] or (mine, theirs) in SIBLINGS_APART:
            bad.append(f"{module} ({mine}) imports {name} ({theirs})")
    return bad


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down_the_layers(module: str) -> None:
    assert violations(module) == []


def test_the_layer_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The check above can fail: a store module importing the web layer and aiohttp."""
    assert part("recsvc.store.keys") == "recsvc.store"
    assert LAYERS[part("recsvc.web.app")] > LAYERS[part("recsvc.store.keys")]
    module = "recsvc.store.keys"
    original = source_of(module).read_text()
    tree = ast.parse(original + "\nfrom recsvc.web import app\nimport aiohttp\n")
    names = [
        n.module if isinstance(n, ast.ImportFrom) else n.names[0].name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
    ]
    assert "recsvc.web" in names and "aiohttp" in names
    # Run the same rule over the augmented source.
    fake = tmp_path / "keys.py"
    fake.write_text(original + "\nfrom recsvc.web import app\nimport aiohttp\n")
    saved = source_of
    try:
        globals()["source_of"] = lambda m: fake if m == module else saved(m)
        found = violations(module)
    finally:
        globals()["source_of"] = saved
    assert "recsvc.store.keys imports aiohttp" in found
    assert any("imports recsvc.web.app (recsvc.web)" in v for v in found)


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
