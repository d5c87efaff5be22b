"""The canary controller: steps a roll-out up while its guardrails hold, rolls it
back (and says why) when one fails.

Every worker runs one; a lease in Redis (``{rollout}:controller``) lets one
act at a time, and a worker that takes the lease over rebuilds its view from
the logs, so nothing depends on which worker (or instance) runs it.

Its inputs are the service's own logs (recsvc.ab.impressions): the impression of
every sampled answer carries the model version, the arm, the roll-out and the
share in force when it was served, its strategy, fallback reason and latency;
an outcome carries the request id of the answer it follows. For the step in
progress the controller reads both streams from the step's start, in slices
with a turn of the event loop between them:

- an impression counts for its arm when it belongs to this roll-out *and* was
  served at this step's share (a worker that has not seen a step change yet
  does not blur the comparison);
- an outcome counts for the impression with its request id only when its user
  is the impression's user and the item was shown; others are counted as
  mismatched;
- click and purchase rates count an impression once it is ``outcome_wait``
  seconds old, so both arms' recent answers are not read as "no click" before
  the shopper had time to click; and not while the outcomes log is read only
  part of the way (a backlog after a takeover), whose rest may hold its clicks.

Each tick the guardrails (recsvc.ab.guardrails) are evaluated; a failure rolls
the canary back at once; when the canary has ``min_exposures`` matured
impressions in the step and nothing failed, the next step starts (5 -> 25 ->
50%), and after the last one the canary becomes the stable version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from recsvc.ab.guardrails import ArmStats, Check, Thresholds, evaluate
from recsvc.ab.impressions import FIELD
from recsvc.ab.rollout import (
    CANARY,
    LEASE_KEY,
    PROMOTED,
    ROLLED_BACK,
    STABLE,
    Rollout,
    RolloutStore,
)
from recsvc.store import keys
from recsvc.store.client import REDIS_FAILURES, RedisClient

log = logging.getLogger(__name__)
SLICE = 500  # stream entries per read
READ_MAX = 20_000  # per stream per tick: a backlog is worked off over ticks
MATURE_SLICE = 2_000  # impressions counted between turns of the event loop
# Outcomes are read up to this long before the newest impression read: an
# impression reaches its stream up to a flush interval (recsvc.ab.impressions)
# after the answer, possibly from another worker than its click's outcome.
OUTCOME_LAG_MS = 1000
PENDING_MAX = 500_000  # impressions waiting to mature; beyond, the oldest mature early
SNAPSHOT_SECS = 2.0

# Take the lease when free, renew it when ours; 1 when we hold it.
_LEASE = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_impression(fields: dict[Any, Any]) -> dict[str, Any] | None:
    """One impression stream entry as a dict (recsvc.ab.impressions writes its
    one field); None when it is not one."""
    raw = fields.get(FIELD.encode()) or fields.get(FIELD)
    if raw is None:
        return None
    d = orjson.loads(raw)
    return d if isinstance(d, dict) else None


# An impression waiting for its clicks: (stream time s, arm, user, its items as
# one string "\x1fa\x1fb\x1f"). Tuples of strings and numbers only, which the
# garbage collector stops tracking: a backlog of 100k of them must not make
# every collection walk a million objects on a serving worker's loop.
Pending = tuple[float, str, str, str]
SEP = "\x1f"
CLICKED, BOUGHT = 1, 2


@dataclass(slots=True)
class StepView:
    """What the controller gathered for one step of one roll-out."""

    rollout_id: str
    share: float
    started_at: float
    impressions_cursor: str
    outcomes_cursor: str
    arms: dict[str, ArmStats] = field(
        default_factory=lambda: {CANARY: ArmStats(), STABLE: ArmStats()}
    )
    pending: dict[str, Pending] = field(default_factory=dict)
    flags: dict[str, int] = field(default_factory=dict)  # request id -> CLICKED | BOUGHT
    order: deque[str] = field(default_factory=deque)
    mismatched_users: int = 0
    other_items: int = 0
    read: int = 0
    # Stream times (ms, Redis clock) up to which each stream has been read whole.
    impressions_until: int = 0
    outcomes_until: int = 0

    def matches(self, r: Rollout) -> bool:
        return (self.rollout_id, self.share, self.started_at) == (
            r.id,
            r.share,
            r.step_started_at,
        )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _ms(entry_id: Any) -> int:
    """A stream entry id's time part (ms)."""
    return int(_text(entry_id).split("-", 1)[0])


def _since(ts: float) -> str:
    return f"{int(ts * 1000)}-0"


class CanaryController:
    def __init__(
        self,
        client: RedisClient,
        store: RolloutStore,
        tick_secs: float = 2.0,
        outcome_wait_secs: float = 30.0,
        thresholds: Thresholds | None = None,
        lease_secs: float = 10.0,
    ) -> None:
        self.client = client
        self.store = store
        self.tick_secs = tick_secs
        self.outcome_wait = outcome_wait_secs
        self.thresholds = thresholds or Thresholds()
        self.lease_ms = int(lease_secs * 1000)
        self.me = f"{os.uname().nodename}:{os.getpid()}:{id(self):x}"
        self.views: dict[str, StepView] = {}
        self._lease = client.register_script(_LEASE)
        self._snapshot_at: dict[str, float] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop``; Redis failures skip a tick (logged once per run of them)."""
        failing = False
        while not stop.is_set():
            try:
                async with asyncio.timeout(max(10.0, 5 * self.tick_secs)):
                    await self.tick()
                failing = False
            except REDIS_FAILURES as exc:
                if not failing:
                    log.warning("canary controller: Redis failed, retrying: %r", exc)
                failing = True
                self.views.clear()
            except Exception:  # the controller must outlive anything in the logs
                log.exception("canary controller tick failed")
                self.views.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.tick_secs)

    async def tick(self) -> list[Rollout]:
        """One look at every running roll-out; the records it wrote."""
        records = await self.store.all()
        running = {n: r for n, r in records.items() if r.running}
        if not running:
            self.views.clear()
            return []
        held = await self._lease(keys=[LEASE_KEY], args=[self.me, self.lease_ms])
        if held != 1:
            self.views.clear()  # another controller acts; rebuild if we take over
            return []
        written = []
        for name, r in running.items():
            out = await self._look(name, r)
            if out is not None:
                written.append(out)
        for name in set(self.views) - set(running):
            del self.views[name]
        return written

    async def _look(self, name: str, r: Rollout) -> Rollout | None:
        view = self.views.get(name)
        if view is None or not view.matches(r):
            since = _since(r.step_started_at)
            view = self.views[name] = StepView(r.id, r.share, r.step_started_at, since, since)
        now_ms = await self._redis_ms()
        await self._read_impressions(name, r, view, now_ms)
        await self._read_outcomes(view)
        # An impression counts once its clicks would have been read: outcome_wait
        # after it reached its stream, by the outcomes read so far (all times
        # are stream times, the Redis clock: no worker's clock matters).
        await self._mature(view, view.outcomes_until / 1000.0 - self.outcome_wait)
        canary, other = view.arms[CANARY], view.arms[STABLE]
        final = canary.impressions >= r.min_exposures
        checks = evaluate(canary, other, r.share, final, self.thresholds)
        failed = [c for c in checks if c.ok is False]
        if failed:
            return await self._decide(r, view, checks, rollback=failed[0])
        needed = {"srm", "model_faults", "ctr", "latency_p99"}
        if final and all(c.ok for c in checks if c.name in needed):
            return await self._decide(r, view, checks, rollback=None)
        now = time.monotonic()
        if now - self._snapshot_at.get(name, 0.0) >= SNAPSHOT_SECS:
            self._snapshot_at[name] = now
            return await self._write(r, replace(r, checks=self._checks(view, checks)))
        return None

    def _checks(self, view: StepView, checks: list[Check]) -> dict[str, Any]:
        return {
            "at": round(time.time(), 3),
            "canary": view.arms[CANARY].summary(),
            "other": view.arms[STABLE].summary(),
            "guardrails": [c.body() for c in checks],
            "mismatched_users": view.mismatched_users,
        }

    async def _decide(
        self, r: Rollout, view: StepView, checks: list[Check], rollback: Check | None
    ) -> Rollout | None:
        snapshot = self._checks(view, checks)
        now = time.time()
        if rollback is not None:
            why = f"{rollback.name}: {rollback.detail}"
            new = replace(r, status=ROLLED_BACK, share=0.0, reason=why, checks=snapshot)
            new = new.noted("rolled_back", at_share=r.share, guardrail=rollback.name, why=why)
            log.warning(
                "canary rolled back",
                extra={"model": r.name, "canary": r.canary, "share": r.share, "why": why},
            )
        else:
            later = [s for s in r.steps if s > r.share]
            if not later or later[0] >= 1.0:
                assert r.canary is not None
                new = replace(
                    r,
                    status=PROMOTED,
                    stable=r.canary,
                    share=0.0,
                    reason=f"guardrails held at every step up to {r.share:.0%}",
                    checks=snapshot,
                )
                new = new.noted("promoted", version=r.canary, by="guardrails")
            else:
                new = replace(r, share=later[0], step_started_at=now, checks=snapshot)
                seen = view.arms[CANARY].impressions
                new = new.noted("stepped_up", to=later[0], canary_impressions=seen)
            log.info(
                "canary %s",
                new.status if new.status == PROMOTED else "stepped up",
                extra={"model": r.name, "canary": r.canary, "share": new.share},
            )
        return await self._write(r, new)

    async def _write(self, old: Rollout, new: Rollout) -> Rollout | None:
        stored = await self.store.put(new, old.rev)
        if stored is None:  # someone (the CLI, another controller) wrote first: look again
            self.views.pop(old.name, None)
        return stored

    async def _redis_ms(self) -> int:
        seconds, micros = await self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def _read_impressions(self, name: str, r: Rollout, view: StepView, now_ms: int) -> None:
        budget = READ_MAX
        while budget > 0:
            entries = (
                await self.client.xrange(
                    keys.IMPRESSIONS, min=view.impressions_cursor, max="+", count=SLICE
                )
                or []
            )
            for entry_id, fields in entries:
                view.impressions_cursor = "(" + _text(entry_id)
                view.impressions_until = _ms(entry_id)
                if not fields:
                    continue
                try:
                    d = decode_impression(fields)
                except (ValueError, TypeError):
                    continue
                if d is not None:
                    self._impression(name, r, view, d, view.impressions_until)
            view.read += len(entries)
            budget -= len(entries)
            if len(entries) < SLICE:  # the stream's end: everything before now is read
                view.impressions_until = max(view.impressions_until, now_ms - 1)
                return
            await asyncio.sleep(0)

    def _impression(
        self, name: str, r: Rollout, view: StepView, d: dict[str, Any], stream_ms: int
    ) -> None:
        arm = d.get("arm")
        if d.get("rollout") != r.id or arm not in (CANARY, STABLE):
            return
        if d.get("canary_share") != r.share:
            return
        user, request_id = d.get("user_id", ""), d.get("request_id", "")
        strategy, reason = d.get("strategy", ""), d.get("fallback_reason")
        latency = d.get("latency_ms")
        view.arms[arm].answer(user, strategy, reason, latency if _number(latency) else None)
        if d.get("strategy") == "model" and request_id and request_id not in view.pending:
            items = d.get("items") or []
            shown = SEP + SEP.join(i for i in items if isinstance(i, str)) + SEP
            view.pending[request_id] = (stream_ms / 1000.0, arm, user, shown)
            view.order.append(request_id)
            if len(view.order) > PENDING_MAX:  # bounded memory: count the oldest now
                self._mature_now(view, float("inf"), len(view.order) - PENDING_MAX)

    async def _read_outcomes(self, view: StepView) -> None:
        """Outcomes up to OUTCOME_LAG_MS before the impressions read, so that an
        outcome is never read before its impression (it would find no answer)."""
        cap = view.impressions_until - OUTCOME_LAG_MS
        budget = READ_MAX
        while budget > 0 and cap > 0:
            entries = (
                await self.client.xrange(
                    keys.OUTCOMES, min=view.outcomes_cursor, max=str(cap), count=SLICE
                )
                or []
            )
            for entry_id, fields in entries:
                view.outcomes_cursor = "(" + _text(entry_id)
                view.outcomes_until = _ms(entry_id)
                if fields:
                    self._outcome(view, {_text(k): _text(v) for k, v in fields.items()})
            budget -= len(entries)
            if len(entries) < SLICE:
                view.outcomes_until = max(view.outcomes_until, cap)
                return
            await asyncio.sleep(0)

    def _outcome(self, view: StepView, o: dict[str, str]) -> None:
        request_id = o.get("request_id", "")
        p = view.pending.get(request_id)
        if p is None:
            return
        if o.get("user_id") != p[2]:
            view.mismatched_users += 1
            return
        item = o.get("item_id", "")
        if not item or SEP in item or f"{SEP}{item}{SEP}" not in p[3]:
            view.other_items += 1
            return
        kind = o.get("type")
        if kind == "click":
            view.flags[request_id] = view.flags.get(request_id, 0) | CLICKED
        elif kind == "purchase":
            view.flags[request_id] = view.flags.get(request_id, 0) | BOUGHT

    async def _mature(self, view: StepView, before: float) -> None:
        """Count the impressions served before ``before``, a slice at a time."""
        for _ in range(len(view.order) // MATURE_SLICE + 1):
            if self._mature_now(view, before, MATURE_SLICE) < MATURE_SLICE:
                return
            await asyncio.sleep(0)  # a turn for the requests this worker serves

    def _mature_now(self, view: StepView, before: float, limit: int) -> int:
        done = 0
        while view.order and done < limit:
            p = view.pending.get(view.order[0])
            if p is not None and p[0] > before:
                break
            request_id = view.order.popleft()
            p = view.pending.pop(request_id, None)
            if p is not None:
                got = view.flags.pop(request_id, 0)
                view.arms[p[1]].matured(p[2], bool(got & CLICKED), bool(got & BOUGHT))
            done += 1
        return done
