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
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import lightgbm as lgb
import numpy as np

from features.neighbours import Binding, Bound, NeighbourTable
from features.schema import FEATURE_NAMES, SCHEMA_HASH
from recsvc.errors import ModelRejected
from recsvc.ranking.scoring import (
    TOLERANCE,
    Compiler,
    NativeScorer,
    Scorer,
    boundary_rows,
    mismatch,
)

log = logging.getLogger(__name__)
MODEL_FILE = "model.txt"
META_FILE = "meta.json"
# Old versions kept per model name when a new one is saved.
KEEP_VERSIONS = 5


# In a version directory: a roll-out record names this version (recsvc models
# promote writes it), so pruning old versions must keep it.
PINNED_FILE = "PINNED"
SAMPLE_FILE = "sample.npy"  # held-out feature rows: checks a compiled scorer
NEIGHBOURS_DIR = "neighbours"  # the learned item-to-item table (features.neighbours)


class LoadedModel:
    """One loaded version. ``scorer`` starts native and may be swapped (one
    assignment) for verified compiled code; requests call ``predict``."""

    __slots__ = ("binding", "booster", "meta", "name", "neighbours", "path", "scorer", "version")

    def __init__(
        self,
        name: str,
        version: str,
        booster: lgb.Booster,
        meta: dict[str, Any],
        path: Path,
        neighbours: NeighbourTable | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.booster = booster
        self.meta = meta
        self.path = path
        self.scorer: Scorer = NativeScorer(booster)
        self.neighbours = neighbours
        # The table bound to the item rows when the model loaded: (epoch, binding).
        # The item cache binds every model again with each view it builds.
        self.binding: tuple[str, Binding] | None = None

    @property
    def key(self) -> str:
        """Unique per loaded version (the item cache keys its bindings by it)."""
        return str(self.path)

    @property
    def exclude_seen(self) -> bool:
        """Whether the training log said items are used once (recorded at training)."""
        return bool(self.meta.get("exclude_seen", False))

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        """Raw scores for a float32 feature matrix, on this thread."""
        return self.scorer.predict(matrix)

    def bound(self, epoch: str, n: int, bindings: dict[str, Binding]) -> Bound | None:
        """The neighbour table bound to an item view (its epoch and row count), or
        None (no table, or no binding for this view yet: the learned features are
        then missing rather than wrong)."""
        if self.neighbours is None:
            return None
        binding = bindings.get(self.key)
        if binding is None and self.binding is not None and self.binding[0] == epoch:
            binding = self.binding[1]
        if binding is None or binding.table_n > n:
            return None
        return Bound(self.neighbours, binding)


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


def save(
    model_dir: Path,
    name: str,
    booster: lgb.Booster,
    meta: dict[str, Any],
    keep: int = KEEP_VERSIONS,
    sample: np.ndarray | None = None,
    neighbours: NeighbourTable | None = None,
) -> Path:
    """Write a new version atomically and prune the versions beyond the newest ``keep``
    (except those a roll-out names: ``pin``).

    ``sample``: real feature rows (float32) kept with the version, on which a
    compiled scorer must reproduce the native scores before it may serve."""
    root = model_dir / name
    root.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    version = now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}"
    tmp = root / f".tmp-{version}-{os.getpid()}"
    tmp.mkdir()
    booster.save_model(str(tmp / MODEL_FILE))
    if sample is not None:
        np.save(tmp / SAMPLE_FILE, np.asarray(sample, dtype=np.float32))
    if neighbours is not None:
        neighbours.save(tmp / NEIGHBOURS_DIR)
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
    for old in versions(model_dir, name)[max(keep, 1) :]:
        if not (old / PINNED_FILE).exists():  # a roll-out still names it
            shutil.rmtree(old, ignore_errors=True)
    return final


def pin(model_dir: Path, name: str, keep: set[str]) -> None:
    """Mark exactly the versions ``keep`` of ``name`` as named by a roll-out
    (``save`` never prunes those); unmark the others."""
    for path in versions(model_dir, name):
        marker = path / PINNED_FILE
        if path.name in keep:
            marker.touch()
        else:
            marker.unlink(missing_ok=True)


def read_meta(path: Path) -> dict[str, Any]:
    """A version's meta.json as a dict ({} when unreadable)."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


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
    neighbours = None
    if meta.get("neighbours"):
        try:
            neighbours = NeighbourTable.load(path / NEIGHBOURS_DIR)
        except Exception as exc:  # whatever the files hold, this version must not serve half
            raise ModelRejected(f"{path}: unreadable {NEIGHBOURS_DIR}/: {exc}") from exc
    name = meta.get("name", path.parent.name)
    return LoadedModel(name, path.name, booster, meta, path, neighbours)


def load_latest(model_dir: Path, name: str) -> LoadedModel | None:
    """The newest version we accept; refused versions are logged and skipped."""
    for path in versions(model_dir, name):
        try:
            return load(path)
        except ModelRejected as exc:
            log.warning("model refused: %s", exc)
    return None


def names(model_dir: Path) -> list[str]:
    """Model names with at least one complete version, sorted."""
    if not model_dir.is_dir():
        return []
    return sorted(p.name for p in model_dir.iterdir() if p.is_dir() and versions(model_dir, p.name))


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """What a reload did for one model name."""

    name: str
    status: str  # loaded | unchanged | refused | absent | pinned
    version: str | None  # the version serving after the reload
    previous: str | None = None
    refused_version: str | None = None
    reason: str | None = None

    def body(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


# The arms of a running canary (recsvc.ab.rollout, which this layer does not import).
CANARY = "canary"
STABLE = "stable"


class Rollout(Protocol):
    """What the registry reads of a roll-out record (recsvc.ab.rollout.Rollout)."""

    @property
    def id(self) -> str: ...
    @property
    def stable(self) -> str: ...
    @property
    def canary(self) -> str | None: ...
    @property
    def share(self) -> float: ...
    @property
    def running(self) -> bool: ...
    def in_canary(self, user_id: str) -> bool: ...
    def body(self) -> dict[str, Any]: ...


class Pick(NamedTuple):
    """The model that serves one user, and the roll-out that chose it (if any)."""

    model: LoadedModel | None
    rollout: Rollout | None = None
    arm: str | None = None  # canary | stable while a canary runs, else None


class ModelRegistry:
    """Every model name under MODEL_DIR, each serving its newest acceptable version,
    unless a roll-out (recsvc.ab.rollout) pins the name to a version and may
    serve a canary version to a slice of the users.

    A newer version replaces the serving one in a single assignment once it has
    loaded (in a worker thread), so requests never wait and never see half a
    swap. A version that is refused is remembered with its reason and not tried
    again; the previous version keeps serving. ``default`` serves requests that
    name no model.
    """

    def __init__(
        self,
        model_dir: Path,
        default: str,
        compiler: Compiler | None = None,
        binder: Callable[[NeighbourTable], tuple[str, Binding]] | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.default = default
        self.compiler = compiler
        # Binds a new version's neighbour table to the current item rows (in the
        # loading thread), so it never serves without its learned features.
        self.binder = binder
        self.models: dict[str, LoadedModel] = {}
        self.refused: dict[tuple[str, str], str] = {}
        # Pinned versions refused, with their files' state then: tried again
        # once that changes (copied in, or repaired), not at every poll.
        self.refused_files: dict[tuple[str, str], tuple[object, ...]] = {}
        self._followed: set[str] = set()  # names with a record at the last follow
        self._marker_warned: set[str] = set()
        # Roll-out records being followed, and the canary versions they serve.
        self.rollouts: dict[str, Rollout] = {}
        self.canaries: dict[str, LoadedModel] = {}
        self._lock = asyncio.Lock()
        self._compiles: set[asyncio.Task[None]] = set()

    def start_compiles(self) -> None:
        """Compile every loaded model in the background (call on the event loop)."""
        for model in self.models.values():
            self._compile_later(model)

    def _compile_later(self, model: LoadedModel) -> None:
        if self.compiler is None:
            return
        task = asyncio.create_task(self._compile(self.compiler, model))
        self._compiles.add(task)
        task.add_done_callback(self._compiles.discard)

    async def _compile(self, compiler: Compiler, model: LoadedModel) -> None:
        """Swap in compiled code once it reproduces the native scores; else keep native."""
        sample_path = model.path / SAMPLE_FILE
        try:
            compiled = await compiler.compiled(model.path / MODEL_FILE)
            checks = [await asyncio.to_thread(boundary_rows, model.booster)]
            if sample_path.is_file():  # real held-out rows (versions from older code lack them)
                checks.append(await asyncio.to_thread(np.load, sample_path))
            native = NativeScorer(model.booster)
            diff = max([await asyncio.to_thread(mismatch, native, compiled, m) for m in checks])
        except Exception:  # any failure: native keeps serving
            log.exception("compiling the model failed; the native scorer serves")
            return
        if diff > TOLERANCE:
            log.error(
                "compiled scores differ from native by %.3g; the native scorer serves",
                diff,
                extra={"model": model.name, "version": model.version},
            )
            return
        model.scorer = compiled
        log.info(
            "compiled scorer serving",
            extra={"model": model.name, "version": model.version, "max_diff": diff},
        )

    async def close(self) -> None:
        for task in list(self._compiles):
            task.cancel()
        await asyncio.gather(*self._compiles, return_exceptions=True)
        if self.compiler is not None:
            self.compiler.close()

    @property
    def current(self) -> LoadedModel | None:
        return self.models.get(self.default)

    def neighbour_tables(self) -> list[tuple[str, NeighbourTable]]:
        """(key, table) of every loaded model (canaries too) with a neighbour table."""
        loaded = [*self.models.values(), *self.canaries.values()]
        return [(m.key, m.neighbours) for m in loaded if m.neighbours is not None]

    def _load(self, path: Path) -> LoadedModel:
        model = load(path)
        if model.neighbours is not None and self.binder is not None:
            model.binding = self.binder(model.neighbours)
        return model

    def get(self, name: str) -> LoadedModel | None:
        return self.models.get(name)

    def pick(self, name: str | None, user_id: str) -> Pick:
        """The version serving ``user_id`` for model ``name`` (None: the default).
        While a canary runs, users in its slice get the canary version; a user of
        the slice on a worker that has not loaded it yet gets the stable version
        with no arm, so no guardrail counts that answer for either side."""
        name = name or self.default
        model = self.models.get(name)
        rollout = self.rollouts.get(name)
        if rollout is None or not rollout.running:
            return Pick(model, rollout)
        if rollout.in_canary(user_id):
            canary = self.canaries.get(name)
            if canary is not None and canary.version == rollout.canary:
                return Pick(canary, rollout, CANARY)
            return Pick(model, rollout)
        if model is None or model.version != rollout.stable:
            return Pick(model, rollout)
        return Pick(model, rollout, STABLE)

    def _load_version(self, name: str, version: str) -> LoadedModel:
        path = self.model_dir / name / version
        if not (path / META_FILE).is_file():
            raise ModelRejected(f"{path}: no such version")
        return self._load(path)

    async def follow(
        self, records: Mapping[str, Rollout], unparsed: AbstractSet[str] = frozenset()
    ) -> dict[str, str]:
        """Serve what the roll-out records say: each recorded name's ``stable``
        version, and its canary while one runs (``unparsed``: names whose record
        is in Redis but could not be read). Names without a record keep
        serving their newest version. Loads happen in a thread before the swap,
        so requests never wait; a version that cannot load keeps the previous
        one serving. Returns {name: reason} for canary versions that could not
        load (the caller rolls those back)."""
        failed: dict[str, str] = {}
        async with self._lock:
            for name, r in records.items():
                current = self.models.get(name)
                key = (name, r.stable)
                if key in self.refused and self.refused_files.get(key) != self._files(*key):
                    del self.refused[key]  # its files changed since: try again
                pinned_refused = key in self.refused
                if (current is None or current.version != r.stable) and not pinned_refused:
                    canary = self.canaries.get(name)
                    try:
                        if canary is not None and canary.version == r.stable:
                            model = canary  # a promotion: the canary is the new stable
                        else:
                            model = await asyncio.to_thread(self._load_version, name, r.stable)
                            self._compile_later(model)
                    except ModelRejected as exc:  # the old one serves until its files change
                        log.error("pinned version refused; the old one serves: %s", exc)
                        self.refused[key] = str(exc)
                        self.refused_files[key] = self._files(*key)
                    else:
                        self.models[name] = model
                        log.info("model pinned", extra={"model": name, "version": r.stable})
                if r.running and r.canary is not None:
                    canary = self.canaries.get(name)
                    if canary is None or canary.version != r.canary:
                        try:
                            canary = await asyncio.to_thread(self._load_version, name, r.canary)
                        except ModelRejected as exc:
                            failed[name] = str(exc)
                            continue
                        self._compile_later(canary)
                        self.canaries[name] = canary
                        log.info("canary loaded", extra={"model": name, "version": r.canary})
                else:
                    self.canaries.pop(name, None)
            for name in set(self.canaries) - set(records):
                del self.canaries[name]
            await self._mark_pinned(records, unparsed)
            self.rollouts = dict(records)
        return failed

    async def _mark_pinned(
        self, records: Mapping[str, Rollout], unparsed: AbstractSet[str]
    ) -> None:
        """Keep this disk's PINNED markers on the versions the records name, as
        `recsvc models promote` sets them where it runs: the controller's own
        promotions and rollbacks, and instances with their own model directory,
        then keep them too (training's pruning spares them; `models list` shows
        them). Checked against the disk at every follow (a version copied in
        later gets its marker). Markers are only ever removed for a name whose
        record this worker saw and then saw gone: never for a record it cannot
        parse (``unparsed``, still in Redis), nor for markers it found without
        having seen a record (over-pinning keeps a version; under-pinning loses
        one to the next training)."""
        wanted = {n: frozenset(v for v in (r.stable, r.canary) if v) for n, r in records.items()}
        for name in self._followed - set(wanted) - set(unparsed):
            wanted[name] = frozenset()  # its record is gone
        failed = await asyncio.to_thread(self._reconcile_markers, wanted)
        for name, why in failed.items():
            if name not in self._marker_warned:
                log.warning("could not mark the pinned versions of %s: %s", name, why)
        self._marker_warned = set(failed)
        self._followed = set(records) | (self._followed & set(unparsed))

    def _reconcile_markers(self, wanted: Mapping[str, frozenset[str]]) -> dict[str, str]:
        """Write the markers that differ from ``wanted``; {name: error} where it failed."""
        failed = {}
        for name, keep in wanted.items():
            try:
                found = versions(self.model_dir, name)
                marked = {p.name for p in found if (p / PINNED_FILE).exists()}
                if marked != {p.name for p in found if p.name in keep}:
                    pin(self.model_dir, name, set(keep))
            except OSError as exc:  # a read-only or failing disk: serving goes on
                failed[name] = str(exc)
        return failed

    def _files(self, name: str, version: str) -> tuple[object, ...]:
        """The state (mtime, size) of a version's directory and files, None for a
        missing one (a copy in progress changes one of them as it goes)."""
        out: list[object] = []
        for file in ("", META_FILE, MODEL_FILE, NEIGHBOURS_DIR):
            try:
                st = (self.model_dir / name / version / file).stat()
            except OSError:
                out.append(None)
            else:
                out.append((st.st_mtime_ns, st.st_size))
        return tuple(out)

    def unfollowed(self) -> dict[str, str]:
        """{name: why} for every roll-out record whose stable version this worker
        does not serve (the version could not load: the one loaded before, often
        the newest on disk, serves instead, which nobody promoted). Names with
        nothing loaded and no directory here are another service's: left out."""
        out = {}
        for name, r in self.rollouts.items():
            current = self.models.get(name)
            if current is not None and current.version == r.stable:
                continue
            if current is None and not (self.model_dir / name).is_dir():
                continue  # a name this worker does not serve (another service's record)
            serving = current.version if current is not None else "none"
            why = self.refused.get((name, r.stable), "not loaded")
            out[name] = f"record's stable {r.stable}, serving {serving}: {why}"
        return out

    def load_now(self) -> None:
        """Blocking first load (at start, before serving)."""
        for name in names(self.model_dir):
            for path in versions(self.model_dir, name):
                try:
                    self.models[name] = self._load(path)
                    break
                except ModelRejected as exc:
                    self.refused[(name, path.name)] = str(exc)
                    log.warning("model refused: %s", exc)

    async def poll(self, interval: float) -> None:
        """Look for newer versions until cancelled; keep the current models on any failure."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload()
            except Exception:  # the poller must outlive any bad file on disk
                log.exception("model poll failed; keeping the current models")

    async def reload(self) -> list[ReloadOutcome]:
        """Load the newest version of every model name when it is newer than the one
        serving; one reload at a time (the poller and the admin route share this)."""
        async with self._lock:
            found = names(self.model_dir)
            outcomes = [await self._reload_one(name) for name in found]
            for name in sorted(set(self.models) - set(found)):
                # Removed from disk: keep serving what is loaded, and say so.
                model = self.models[name]
                outcomes.append(ReloadOutcome(name, "absent", model.version, model.version))
            return outcomes

    async def _reload_one(self, name: str) -> ReloadOutcome:
        """Newer versions, newest first, until one loads; the newest refusal is reported.
        (Only newer than the one serving: an older version never replaces it.)"""
        current = self.models.get(name)
        version = current.version if current else None
        if name in self.rollouts:  # pinned: a new version waits for `recsvc models promote`
            return ReloadOutcome(name, "pinned", version, version)
        candidates = [
            p for p in versions(self.model_dir, name) if version is None or p.name > version
        ]
        if not candidates:
            return ReloadOutcome(name, "unchanged", version, version)
        refused: tuple[str, str] | None = None
        for path in candidates:
            reason = self.refused.get((name, path.name))
            if reason is None:
                try:
                    model = await asyncio.to_thread(self._load, path)
                except ModelRejected as exc:
                    reason = self.refused[(name, path.name)] = str(exc)
                    log.warning("model version refused: %s", exc)
                else:
                    self.models[name] = model
                    self._compile_later(model)
                    log.info("model loaded", extra={"model": name, "version": model.version})
                    if refused is not None:  # loaded an older one: say the newest was refused
                        return ReloadOutcome(name, "refused", model.version, version, *refused)
                    return ReloadOutcome(name, "loaded", model.version, version)
            refused = refused or (path.name, reason)
        assert refused is not None
        return ReloadOutcome(name, "refused", version, version, *refused)
