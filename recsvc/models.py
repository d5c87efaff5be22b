"""Model registry on disk: ``MODEL_DIR/<name>/<version>/{model.txt,meta.json}``.

Versions are UTC timestamps, so their names sort by age. A version is written
to a temporary directory and renamed into place, so a reader never sees half
of one. A model whose feature names differ from the code's is refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from features.schema import FEATURE_NAMES, SCHEMA_HASH
from recsvc.errors import ModelRejected

log = logging.getLogger(__name__)
MODEL_FILE = "model.txt"
META_FILE = "meta.json"
# Old versions kept per model name when a new one is saved.
KEEP_VERSIONS = 5


@dataclass(frozen=True, slots=True)
class LoadedModel:
    name: str
    version: str
    booster: lgb.Booster
    meta: dict[str, Any]

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        """Raw scores for a float32 feature matrix, in one call on one thread."""
        return np.asarray(self.booster.predict(matrix, num_threads=1))


def versions(model_dir: Path, name: str) -> list[Path]:
    """Complete version directories of a model, newest first."""
    root = model_dir / name
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / META_FILE).is_file()
    ]
    return sorted(found, key=lambda p: p.name, reverse=True)


def save(model_dir: Path, name: str, booster: lgb.Booster, meta: dict[str, Any]) -> Path:
    """Write a new version atomically and prune versions beyond KEEP_VERSIONS."""
    root = model_dir / name
    root.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    version = now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}"
    tmp = root / f".tmp-{version}-{os.getpid()}"
    tmp.mkdir()
    booster.save_model(str(tmp / MODEL_FILE))
    full_meta = {
        "name": name,
        "version": version,
        "created_at": now.isoformat(),
        "feature_names": list(FEATURE_NAMES),
        "schema_hash": SCHEMA_HASH,
        **meta,
    }
    (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2, sort_keys=True) + "\n")
    final = root / version
    tmp.rename(final)
    for old in versions(model_dir, name)[KEEP_VERSIONS:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path) -> LoadedModel:
    """Load one version; ModelRejected when its schema is not the code's or it is unreadable."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ModelRejected(f"{path}: unreadable {META_FILE}: {exc}") from exc
    if not isinstance(meta, dict):
        raise ModelRejected(f"{path}: {META_FILE} is not a JSON object")
    names = meta.get("feature_names")
    if names != list(FEATURE_NAMES):
        raise ModelRejected(
            f"{path}: feature names differ from this code's schema {SCHEMA_HASH} "
            f"(model has {meta.get('schema_hash')})"
        )
    try:
        booster = lgb.Booster(model_file=str(path / MODEL_FILE))
    except Exception as exc:  # whatever LightGBM raises, this version must not serve
        raise ModelRejected(f"{path}: unreadable {MODEL_FILE}: {exc}") from exc
    if booster.feature_name() != list(FEATURE_NAMES):
        raise ModelRejected(f"{path}: {MODEL_FILE} feature names differ from {META_FILE}")
    return LoadedModel(
        name=meta.get("name", path.parent.name), version=path.name, booster=booster, meta=meta
    )


def load_latest(model_dir: Path, name: str) -> LoadedModel | None:
    """The newest version we accept; refused versions are logged and skipped."""
    for path in versions(model_dir, name):
        try:
            return load(path)
        except ModelRejected as exc:
            log.warning("model refused: %s", exc)
    return None


class ModelRegistry:
    """The model currently serving, swapped in whole when a newer good version appears."""

    def __init__(self, model_dir: Path, name: str) -> None:
        self.model_dir = model_dir
        self.name = name
        self.current: LoadedModel | None = None
        self.refused: set[str] = set()
        self.checked_at = 0.0

    def load_now(self) -> None:
        self.current = load_latest(self.model_dir, self.name)
        self.checked_at = time.monotonic()

    async def poll(self, interval: float) -> None:
        """Look for newer versions until cancelled; keep the current model on any failure."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check()
            except Exception:  # the poller must outlive any bad file on disk
                log.exception("model poll failed; keeping the current model")

    async def check(self) -> None:
        """Load the newest version if it is newer than the current one and acceptable."""
        newest = versions(self.model_dir, self.name)
        if not newest:
            return
        top = newest[0]
        if (self.current and top.name <= self.current.version) or top.name in self.refused:
            return
        try:
            model = await asyncio.to_thread(load, top)
        except ModelRejected as exc:
            self.refused.add(top.name)
            log.warning("new model version refused, keeping the current one: %s", exc)
            return
        self.current = model
        log.info("model loaded", extra={"model": model.name, "version": model.version})
