"""Model roll-outs: which version of a model name serves whom, shared in Redis.

One hash, ``{rollout}:state``, holds a JSON record per model name. While a
name has a record, its serving version is the record's (``stable``), not the
newest on disk: a newly trained version waits for ``recsvc models promote``.
A running canary serves ``canary`` to a stable hash slice of the users, the
first ``share`` of the buckets of MurmurHash3 of ``"canary:<name>:<id>:<user>"``
(its own salt: independent of every experiment's buckets, and a new roll-out
picks other users). Slices are nested, so a user in the 5% slice stays in the
canary at 25%, 50% and 100%.

Every change is a compare-and-set on the record's ``rev`` (a Lua script), so
the CLI, the controller (recsvc.ab.canary) and a worker that cannot load a
version never overwrite each other's decisions. Workers poll the hash (one
HGETALL) and follow it; the state survives restarts of workers and of Redis
(with its persistence).
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import orjson

from recsvc.ab.experiments import BUCKETS, murmur3_32
from recsvc.store.client import RedisClient

log = logging.getLogger(__name__)
STATE_KEY = "{rollout}:state"
LEASE_KEY = "{rollout}:controller"
CANARY_SEED = 0x5EED
DEFAULT_STEPS = (0.05, 0.25, 0.5, 1.0)
HISTORY_MAX = 50

RUNNING = "running"
PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"
STATUSES = (RUNNING, PROMOTED, ROLLED_BACK)

STABLE = "stable"
CANARY = "canary"

# Compare-and-set of one record: ARGV[1] the rev the writer read (0: none),
# ARGV[2] the new record. Returns 1 when written, 0 when the rev moved.
_CAS = """
-- A record without a numeric rev (written by hand) reads as rev 0, as in Python.
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local rev = 0
if cur then
  local stored = cjson.decode(cur)['rev']
  if type(stored) == 'number' then rev = stored end
end
if tostring(rev) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""


class RolloutError(ValueError):
    """A roll-out command that cannot be carried out; the message says why."""


def canary_bucket(name: str, rollout_id: str, user_id: str) -> int:
    return murmur3_32(f"canary:{name}:{rollout_id}:{user_id}".encode(), CANARY_SEED) % BUCKETS


@dataclass(frozen=True, slots=True)
class Rollout:
    """One model name's roll-out record."""

    name: str
    id: str
    stable: str
    canary: str | None
    status: str
    share: float  # of users on the canary (0 when none runs)
    steps: tuple[float, ...] = DEFAULT_STEPS
    min_exposures: int = 2000
    rev: int = 0
    started_at: float = 0.0
    # When the current step started (seconds): the controller reads the
    # impressions of the step from this time on.
    step_started_at: float = 0.0
    reason: str | None = None
    # The controller's last view of the guardrails (for `recsvc models status`).
    checks: dict[str, Any] = field(default_factory=dict)
    history: tuple[dict[str, Any], ...] = ()

    @property
    def running(self) -> bool:
        return self.status == RUNNING and self.canary is not None

    def in_canary(self, user_id: str) -> bool:
        return self.running and canary_bucket(self.name, self.id, user_id) < round(
            self.share * BUCKETS
        )

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Rollout:
        """RolloutError when ``raw`` is not a record this code can follow (e.g.
        edited by hand into another shape)."""
        try:
            d = orjson.loads(raw)
            d["steps"] = tuple(float(x) for x in d.get("steps", DEFAULT_STEPS))
            d["history"] = tuple(d.get("history", ()))
            known = set(cls.__dataclass_fields__)
            r = cls(**{k: v for k, v in d.items() if k in known})
        except (ValueError, TypeError, AttributeError) as exc:
            raise RolloutError(f"not a roll-out record: {exc}") from None
        ok = (
            isinstance(r.name, str)
            and isinstance(r.id, str)
            and isinstance(r.stable, str)
            and (r.canary is None or isinstance(r.canary, str))
            and r.status in STATUSES
            and isinstance(r.share, int | float)
            and 0.0 <= r.share <= 1.0
            and isinstance(r.rev, int)
            and isinstance(r.min_exposures, int)
            and isinstance(r.step_started_at, int | float)
        )
        if not ok:
            raise RolloutError(f"not a roll-out record: {str(raw)[:200]}")
        return r

    def noted(self, event: str, **extra: Any) -> Rollout:
        """A copy with one more history line (the newest HISTORY_MAX kept)."""
        line = {"at": round(time.time(), 3), "event": event, "share": self.share, **extra}
        return replace(self, history=(*self.history, line)[-HISTORY_MAX:])

    def body(self) -> dict[str, Any]:
        return asdict(self)


def parse_share(text: str) -> float:
    """'5%' or '0.05' -> 0.05; RolloutError unless within (0, 1]."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        raise RolloutError(f"not a share: {text!r} (write 5% or 0.05)") from None
    if not 0.0 < value <= 1.0:
        raise RolloutError(f"a share must be within (0, 100%], not {text!r}")
    return value


def plan_steps(first: float, steps: tuple[float, ...]) -> tuple[float, ...]:
    """The shares a canary goes through: ``first``, then the larger given steps, to 100%."""
    rest = sorted({s for s in steps if first < s < 1.0})
    return (first, *rest, 1.0) if first < 1.0 else (1.0,)


class RolloutStore:
    """The records in Redis (``client``: a redis-py asyncio client)."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self._cas = client.register_script(_CAS)
        self._bad: dict[str, Any] = {}
        # Names whose record the last ``all`` could not parse (still in Redis).
        self.unparsed: frozenset[str] = frozenset()

    async def all(self) -> dict[str, Rollout]:
        """Every record that parses; one that does not is left out (its name then
        serves its newest version), logged once, and named in ``unparsed``."""
        raw = await self.client.hgetall(STATE_KEY)
        out: dict[str, Rollout] = {}
        unparsed = set()
        for k, v in raw.items():
            name = k.decode() if isinstance(k, bytes) else str(k)
            try:
                out[name] = Rollout.from_json(v)
            except RolloutError as exc:
                unparsed.add(name)
                if self._bad.get(name) != v:
                    log.error("roll-out record of %r left out: %s", name, exc)
                self._bad[name] = v
        self.unparsed = frozenset(unparsed)
        return out

    async def get(self, name: str) -> Rollout | None:
        raw = await self.client.hget(STATE_KEY, name)
        return Rollout.from_json(raw) if raw is not None else None

    async def put(self, new: Rollout, expected_rev: int) -> Rollout | None:
        """Write ``new`` (with rev + 1) when the stored rev is still ``expected_rev``
        (0: no record yet); the stored record, or None when someone else wrote first."""
        stored = replace(new, rev=expected_rev + 1)
        ok = await self._cas(keys=[STATE_KEY], args=[new.name, str(expected_rev), stored.to_json()])
        return stored if ok == 1 else None

    async def delete(self, name: str) -> bool:
        return bool(await self.client.hdel(STATE_KEY, name))


def new_rollout(
    name: str,
    stable: str,
    canary: str | None,
    first_share: float,
    steps: tuple[float, ...],
    min_exposures: int,
) -> Rollout:
    """A canary from ``stable`` to ``canary`` at ``first_share``; or, with no canary
    (or a first share of 100%), ``stable`` pinned for everyone."""
    now = time.time()
    if canary is None or first_share >= 1.0:
        pinned = canary or stable
        record = Rollout(name, secrets.token_hex(4), pinned, None, PROMOTED, 0.0)
        record = replace(record, started_at=now, step_started_at=now)
        return record.noted("promoted", version=pinned, by="operator")
    record = Rollout(
        name,
        secrets.token_hex(4),
        stable,
        canary,
        RUNNING,
        first_share,
        plan_steps(first_share, steps),
        min_exposures,
        started_at=now,
        step_started_at=now,
    )
    return record.noted("started", stable=stable, canary=canary)


async def refuse_canary(store: RolloutStore, name: str, version: str, why: str) -> None:
    """Roll back a running canary that a worker cannot load (the version is broken
    or missing on this instance's disk): serving it to some users and not to others
    would make every guardrail wrong."""
    for _ in range(5):
        r = await store.get(name)
        if r is None or not r.running or r.canary != version:
            return
        reason = f"load: the canary version could not load on {socket.gethostname()}: {why}"
        new = replace(r, status=ROLLED_BACK, share=0.0, reason=reason)
        if await store.put(new.noted("rolled_back", at_share=r.share, guardrail="load"), r.rev):
            return
