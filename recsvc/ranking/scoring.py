"""Scorers for a loaded model: native LightGBM, or the same trees compiled to
machine code by lleaves (LLVM), about 15x faster for 200 candidates.

A compiled scorer replaces the native one only after it has been built and
checked: the compile runs in a child process (it is CPU-bound Python and
would hold the GIL), writes an object file to a cache keyed by the model file,
the lleaves/llvmlite versions and the host CPU, and the result must match
native predictions to 1e-6 on the model's own held-out feature rows
(``sample.npy``, written at training) and on rows built from the trees' split
thresholds. Until then, and whenever anything about it fails, the native
scorer serves.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import lightgbm as lgb
import numpy as np

from features.schema import flush_tiny

log = logging.getLogger(__name__)
# Largest |compiled - native| accepted on the verification rows.
TOLERANCE = 1e-6


class Scorer(Protocol):
    @property
    def name(self) -> str: ...

    def predict(self, matrix: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class NativeScorer:
    booster: lgb.Booster
    name: str = "native"

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        """Raw scores, one call on one thread."""
        return np.asarray(self.booster.predict(matrix, num_threads=1))


@dataclass(frozen=True, slots=True)
class CompiledScorer:
    model: Any  # lleaves.Model (untyped library)
    name: str = "lleaves"

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        """Raw scores; lleaves drops the GIL while its code runs."""
        return np.asarray(self.model.predict(matrix, n_jobs=1))


def available() -> bool:
    try:
        import lleaves  # noqa: F401
    except ImportError:
        return False
    return True


def cache_key(model_file: Path) -> str:
    """Object code depends on the trees, the compiler versions and the CPU."""
    import llvmlite.binding as llvm

    h = hashlib.sha256(model_file.read_bytes())
    for part in (
        metadata.version("lleaves"),
        metadata.version("llvmlite"),
        platform.machine(),
        llvm.get_host_cpu_name(),
        llvm.get_host_cpu_features().flatten(),
    ):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:32]


def compile_to_cache(model_file: str, cache: str) -> None:
    """Compile a model to an object file (runs in a child process); atomic rename."""
    import lleaves

    tmp = f"{cache}.tmp{os.getpid()}"
    model = lleaves.Model(model_file=model_file)
    model.compile(cache=tmp, raw_score=True)
    os.replace(tmp, cache)


def load_compiled(model_file: Path, cache: Path) -> CompiledScorer:
    """Load compiled code from the cache (no compilation: fast)."""
    import lleaves

    model = lleaves.Model(model_file=str(model_file))
    model.compile(cache=str(cache), raw_score=True)
    return CompiledScorer(model)


def boundary_rows(booster: lgb.Booster, rows: int = 1024, seed: int = 0) -> np.ndarray:
    """Feature rows made of the model's own split thresholds, the floats just either
    side of them, and NaN: every comparison a tree makes is exercised at its edge.
    Used to verify compiled code for versions saved without real sample rows."""
    rng = np.random.default_rng(seed)
    n_features = booster.num_feature()
    values: list[list[float]] = [[np.nan, 0.0] for _ in range(n_features)]

    def walk(node: dict[str, Any]) -> None:
        if "split_feature" not in node:
            return
        t = node["threshold"]
        if isinstance(t, int | float):
            # LightGBM writes thresholds beyond float32's range as 1e300 and the
            # like; they become inf here, which still tests that side.
            with np.errstate(over="ignore"):
                t32 = np.float32(t)
            values[node["split_feature"]] += [
                float(t32),
                float(np.nextafter(t32, np.float32(np.inf))),
                float(np.nextafter(t32, np.float32(-np.inf))),
            ]
        walk(node["left_child"])
        walk(node["right_child"])

    for tree in booster.dump_model()["tree_info"]:
        walk(tree["tree_structure"])
    out = np.empty((rows, n_features), dtype=np.float32)
    for f, options in enumerate(values):
        out[:, f] = rng.choice(np.asarray(options, dtype=np.float32), size=rows)
    return flush_tiny(out)  # as build_matrix feeds the scorers


def mismatch(native: Scorer, compiled: Scorer, sample: np.ndarray) -> float:
    """Largest absolute difference between two scorers on the same rows."""
    return float(np.max(np.abs(native.predict(sample) - compiled.predict(sample)), initial=0.0))


class Compiler:
    """Builds and caches compiled scorers off the event loop, one compile at a time,
    each in a child process (`python -m recsvc.ranking.scoring MODEL CACHE`) that a stop or
    a cancellation kills at once."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._lock = asyncio.Lock()
        self._proc: asyncio.subprocess.Process | None = None

    async def compiled(self, model_file: Path) -> CompiledScorer:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        cache = self.cache_dir / f"{await asyncio.to_thread(cache_key, model_file)}.o"
        async with self._lock:
            if not cache.exists():
                proc = self._proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    *("-m", "recsvc.ranking.scoring", str(model_file), str(cache)),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                )
                try:
                    _, err = await proc.communicate()
                except asyncio.CancelledError:
                    proc.kill()
                    raise
                finally:
                    self._proc = None
                if proc.returncode != 0:
                    tail = err.decode(errors="replace").strip().splitlines()[-1:]
                    raise RuntimeError(f"compile exited with {proc.returncode}: {tail}")
        return await asyncio.to_thread(load_compiled, model_file, cache)

    def close(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()


if __name__ == "__main__":
    compile_to_cache(sys.argv[1], sys.argv[2])
