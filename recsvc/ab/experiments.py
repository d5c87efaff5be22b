"""A/B experiments: the TOML file, stable assignment, and what a variant selects.

Assignment is a pure function of (salt, user id): MurmurHash3 (x86, 32 bit, the
hash the Unleash SDKs use) of ``"<salt>:<user id>"`` decides whether the user is
in the experiment's traffic (seed 0) and, independently, which variant (seed
86028157, Unleash's variant seed), each as a bucket in 0..9999. Nothing on this
path touches Redis or the clock, so every process, and every restart, agrees.
"""

from __future__ import annotations

import asyncio
import logging
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from features.candidates import SOURCES

log = logging.getLogger(__name__)
BUCKETS = 10_000
TRAFFIC_SEED = 0
VARIANT_SEED = 86028157
STRATEGIES = ("model", "popular")
GENERATED_SOURCES = tuple(s for s in SOURCES if s != "request")
_M = 0xFFFFFFFF


class ExperimentsError(ValueError):
    """An experiments file that must not serve; the message names the experiment."""


def murmur3_32(data: bytes, seed: int = 0) -> int:
    """MurmurHash3 x86_32 (Austin Appleby's reference), unsigned."""
    c1, c2 = 0xCC9E2D51, 0x1B873593
    h = seed & _M
    n = len(data)
    end = n - n % 4
    for i in range(0, end, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * c1) & _M
        k = ((k << 15) | (k >> 17)) & _M
        k = (k * c2) & _M
        h ^= k
        h = ((h << 13) | (h >> 19)) & _M
        h = (h * 5 + 0xE6546B64) & _M
    tail = data[end:]
    k = 0
    if len(tail) == 3:
        k ^= tail[2] << 16
    if len(tail) >= 2:
        k ^= tail[1] << 8
    if tail:
        k ^= tail[0]
        k = (k * c1) & _M
        k = ((k << 15) | (k >> 17)) & _M
        k = (k * c2) & _M
        h ^= k
    h ^= n
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M
    h ^= h >> 16
    return h


def bucket(salt: str, user_id: str, seed: int) -> int:
    return murmur3_32(f"{salt}:{user_id}".encode(), seed) % BUCKETS


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    weight: float
    model: str | None = None
    strategy: str | None = None
    sources: tuple[str, ...] | None = None
    cap: int | None = None

    def parameters(self) -> dict[str, Any]:
        """What this variant sets (unset parameters keep the default configuration)."""
        values: dict[str, Any] = {"model": self.model, "strategy": self.strategy}
        values |= {"sources": self.sources, "cap": self.cap}
        return {k: v for k, v in values.items() if v is not None}


@dataclass(frozen=True, slots=True)
class Experiment:
    name: str
    salt: str
    enabled: bool
    traffic: float
    allow_override: bool
    variants: tuple[Variant, ...]

    def in_traffic(self, user_id: str) -> bool:
        return bucket(self.salt, user_id, TRAFFIC_SEED) < round(self.traffic * BUCKETS)

    def variant_for(self, user_id: str) -> Variant:
        """The variant by cumulative weight over the user's variant bucket."""
        b = bucket(self.salt, user_id, VARIANT_SEED)
        total = sum(v.weight for v in self.variants)
        edge = 0.0
        for v in self.variants:
            edge += v.weight
            if b < edge / total * BUCKETS:
                return v
        return self.variants[-1]

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)

    @property
    def weights(self) -> dict[str, Any]:
        """Traffic share and variant weights, as an impression records them."""
        return {"traffic": self.traffic, "variants": {v.name: v.weight for v in self.variants}}


@dataclass(frozen=True, slots=True)
class Assignment:
    """A user's variants (experiment -> variant), which were forced, the merged
    parameters they select, and the weights of each experiment the user is in
    (Experiment.weights) as they were when assigned."""

    variants: dict[str, str] = field(default_factory=dict)
    forced: frozenset[str] = frozenset()
    parameters: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Experiments:
    experiments: tuple[Experiment, ...] = ()
    source: str = ""
    # Experiment.weights by name, built once: every assignment records them.
    weights: dict[str, dict[str, Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", {e.name: e.weights for e in self.experiments})

    def assign(self, user_id: str, flags: dict[str, str] | None = None) -> Assignment:
        """Variants for a user; ``flags`` (experiment -> variant) are honoured only where
        the experiment allows overrides and names an existing variant."""
        variants: dict[str, str] = {}
        forced: set[str] = set()
        parameters: dict[str, Any] = {}
        for exp in self.experiments:
            if not exp.enabled:
                continue
            wanted = (flags or {}).get(exp.name)
            chosen = exp.variant(wanted) if wanted and exp.allow_override else None
            if chosen is not None:
                forced.add(exp.name)
            elif exp.in_traffic(user_id):
                chosen = exp.variant_for(user_id)
            else:
                continue
            variants[exp.name] = chosen.name
            parameters |= chosen.parameters()
        if not variants:
            return Assignment()
        weights = {name: self.weights[name] for name in variants}
        return Assignment(variants, frozenset(forced), parameters, weights)


def _variant(exp: str, raw: dict[str, Any]) -> Variant:
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ExperimentsError(f"experiment {exp!r}: a variant has no name")
    weight = raw.get("weight")
    if not isinstance(weight, int | float) or isinstance(weight, bool) or weight <= 0:
        raise ExperimentsError(f"experiment {exp!r}, variant {name!r}: weight must be > 0")
    strategy = raw.get("strategy")
    if strategy is not None and strategy not in STRATEGIES:
        raise ExperimentsError(
            f"experiment {exp!r}, variant {name!r}: unknown strategy {strategy!r} "
            f"(one of {', '.join(STRATEGIES)})"
        )
    sources = raw.get("sources")
    if sources is not None:
        if (
            not isinstance(sources, list)
            or not sources
            or not all(isinstance(x, str) for x in sources)
            or not set(sources) <= set(GENERATED_SOURCES)
        ):
            raise ExperimentsError(
                f"experiment {exp!r}, variant {name!r}: sources must be a non-empty list of "
                f"{', '.join(GENERATED_SOURCES)}"
            )
        sources = tuple(sources)
    cap = raw.get("cap")
    if cap is not None and (
        not isinstance(cap, int) or isinstance(cap, bool) or not 1 <= cap <= 1000
    ):
        raise ExperimentsError(f"experiment {exp!r}, variant {name!r}: cap must be 1..1000")
    model = raw.get("model")
    if model is not None and not isinstance(model, str):
        raise ExperimentsError(f"experiment {exp!r}, variant {name!r}: model must be a name")
    unknown = set(raw) - {"name", "weight", "model", "strategy", "sources", "cap"}
    if unknown:
        raise ExperimentsError(
            f"experiment {exp!r}, variant {name!r}: unknown keys {', '.join(sorted(unknown))}"
        )
    return Variant(name, float(weight), model, strategy, sources, cap)


def parse(text: str, source: str, models: set[str] | None) -> Experiments:
    """Validate an experiments file; ExperimentsError names what is wrong and where.
    ``models``: the model names that can serve (None: do not check, e.g. for a report)."""
    try:
        return _parse(text, source, models)
    except ExperimentsError:
        raise
    except (AttributeError, TypeError, ValueError) as exc:  # a shape we did not expect
        raise ExperimentsError(
            f"{source}: not an experiments file ([[experiment]] tables with "
            f"[[experiment.variant]] tables): {type(exc).__name__}: {exc}"
        ) from None


def _bool(exp: str, raw: dict[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ExperimentsError(f"experiment {exp!r}: {key} must be true or false")
    return value


def _parse(text: str, source: str, models: set[str] | None) -> Experiments:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentsError(f"{source}: not valid TOML: {exc}") from None
    if not isinstance(doc.get("experiment", []), list):
        raise ExperimentsError(f"{source}: write experiments as [[experiment]] tables")
    unknown_top = set(doc) - {"experiment"}
    if unknown_top:
        raise ExperimentsError(f"{source}: unknown tables {', '.join(sorted(unknown_top))}")
    out: list[Experiment] = []
    for raw in doc.get("experiment", []):
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise ExperimentsError(f"{source}: an experiment has no name")
        if any(e.name == name for e in out):
            raise ExperimentsError(f"experiment {name!r} is defined twice")
        salt = raw.get("salt", name)
        traffic = raw.get("traffic", 1.0)
        if (
            isinstance(traffic, bool)
            or not isinstance(traffic, int | float)
            or not 0 <= traffic <= 1
        ):
            raise ExperimentsError(f"experiment {name!r}: traffic must be within 0..1")
        raw_variants = raw.get("variant", [])
        if not isinstance(raw_variants, list):
            raise ExperimentsError(
                f"experiment {name!r}: write variants as [[experiment.variant]] tables"
            )
        variants = tuple(_variant(name, v) for v in raw_variants)
        if not variants:
            raise ExperimentsError(f"experiment {name!r}: no variants")
        if len({v.name for v in variants}) != len(variants):
            raise ExperimentsError(f"experiment {name!r}: two variants share a name")
        for v in variants:
            if v.model is not None and models is not None and v.model not in models:
                raise ExperimentsError(
                    f"experiment {name!r}, variant {v.name!r}: unknown model {v.model!r} "
                    f"(loaded: {', '.join(sorted(models or ())) or 'none'})"
                )
        unknown = set(raw) - {"name", "salt", "enabled", "traffic", "allow_override", "variant"}
        if unknown:
            raise ExperimentsError(
                f"experiment {name!r}: unknown keys {', '.join(sorted(unknown))}"
            )
        out.append(
            Experiment(
                name=name,
                salt=str(salt),
                enabled=_bool(name, raw, "enabled", True),
                traffic=float(traffic),
                allow_override=_bool(name, raw, "allow_override", False),
                variants=variants,
            )
        )
    # Two live experiments must not both set a parameter: their traffic overlaps.
    owner: dict[str, str] = {}
    for exp in out:
        if not exp.enabled:
            continue
        for param in sorted({p for v in exp.variants for p in v.parameters()}):
            if param in owner:
                raise ExperimentsError(
                    f"experiments {owner[param]!r} and {exp.name!r} both set {param!r} "
                    "for the same users"
                )
            owner[param] = exp.name
    return Experiments(tuple(out), source)


def load(path: Path, models: set[str]) -> Experiments:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ExperimentsError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ExperimentsError(f"{path}: not a UTF-8 text file") from None
    return parse(text, str(path), models)


class ExperimentsHolder:
    """The experiments serving now; a reload swaps in a new, validated set, or keeps
    the old one and says why."""

    def __init__(self, path: Path | None, models: Callable[[], set[str]]) -> None:
        self.path = path
        self.models = models
        self.current = Experiments()
        self._mtime: float | None = None
        self._refused: str | None = None

    def load_now(self) -> None:
        """At start: a bad file stops the service (nothing has served from it yet)."""
        if self.path is not None:
            self._mtime = self.path.stat().st_mtime if self.path.exists() else None
            self.current = load(self.path, self.models())

    def reload(self) -> tuple[bool, str]:
        if self.path is None:
            return False, "no experiments file is configured (RECSVC_EXPERIMENTS)"
        try:
            mtime = self.path.stat().st_mtime if self.path.exists() else None
            fresh = load(self.path, self.models())
        except ExperimentsError as exc:
            # The file's time is not recorded: the poller tries again (a model the
            # file names may still be loading), logging each distinct reason once.
            if str(exc) != self._refused:
                log.warning("experiments reload refused, the old ones keep serving: %s", exc)
            self._refused = str(exc)
            return False, str(exc)
        self._mtime, self._refused = mtime, None
        self.current = fresh
        names = [e.name for e in fresh.experiments]
        log.info("experiments loaded", extra={"experiments": names})
        return True, f"{len(names)} experiments: {', '.join(names) or 'none'}"

    async def poll(self, interval: float) -> None:
        """Reload when the file changes (its mtime), until cancelled."""
        while True:
            await asyncio.sleep(interval)
            if self.path is None:
                continue
            try:
                mtime = self.path.stat().st_mtime
            except OSError:
                continue
            if mtime != self._mtime:
                try:
                    self.reload()
                except Exception:  # the poller must outlive any file
                    log.exception("experiments reload failed; the old ones keep serving")
