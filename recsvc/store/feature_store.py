"""The Redis feature store: one-round-trip user reads, atomic Lua updates of users and
item shards, item reads shard by shard (``recsvc.store.items``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from redis.asyncio import RedisCluster
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from features.events import COVISIT_BUCKET_SECS, MAX_FUTURE_SECS, PURCHASED_MAX, RECENT_MAX
from features.state import N_SHARDS, ItemTable, UserState, covisit_bucket, item_row, shard_of
from recsvc.errors import Overloaded, StoreUnavailable
from recsvc.ops import metrics
from recsvc.ops.looplag import LoopLag
from recsvc.settings import Settings
from recsvc.store import keys
from recsvc.store.breaker import CircuitBreaker
from recsvc.store.client import REDIS_FAILURES, Gate, PoolExhausted, RedisClient, TopologyRefresh
from recsvc.store.codec import (
    ITEM_ROW_BYTES,
    STORAGE_FORMAT,
    decode_user,
    dedupe_record,
    item_layout,
    user_layout,
)
from recsvc.store.items import (
    DELTA_MAX_ROWS,
    ItemsRead,
    ShardCursor,
    ShardRead,
    decode_shard,
    place_full,
    rows_for,
)
from recsvc.store.scripts import ScriptCall, run_scripts, source


class IncompatibleStore(Exception):
    """Redis holds recsvc data in another storage format."""

    def __init__(self, found: int) -> None:
        self.found = found
        super().__init__(
            f"Redis holds recsvc data in storage format {found}; this version reads "
            f"format {STORAGE_FORMAT}. Load the data again into an empty Redis "
            "(`recsvc import` or `recsvc seed`), or run the version that wrote it."
        )


class ItemWriteFailed(StoreUnavailable):
    """Some events' item side could not be written (a full or broken shard); the
    others were applied. ``results`` holds 1 (applied) / 0 (duplicate) / None
    (failed) or UNKNOWN_ITEM per event, ``failed`` the reason per failed event
    index. The item side of a failed event wrote nothing; its user side may
    have been applied (a retry then counts it once: both sides deduplicate on
    their own)."""

    def __init__(self, results: list[int | None], failed: dict[int, str]) -> None:
        self.results = results
        self.failed = failed
        super().__init__(f"item writes failed for {len(failed)} event(s)")


# apply_events' answer for an event whose item no shard holds, refused by the
# unknown-item policy (Settings.unknown_items): nothing was written for it.
UNKNOWN_ITEM = -1
UNKNOWN_REASON = "unknown_item"
# A Redis read is only called slow (a breaker failure) after at least this long.
REDIS_SLOW_SECS = 0.002
# Entries per item-script call: bounds how long one call holds a shard's Redis.
ITEM_CALL_MAX = 2_000
# User script calls per pipeline: bounds event-loop and Redis time per step.
USERS_PER_PIPELINE = 100
# A shard's rows live in one string: at most proto-max-bulk-len bytes (512 MiB
# unless configured; read at check_format where CONFIG is allowed).
DEFAULT_MAX_BULK = 512 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class EventWrite:
    """One event to apply, with the item attributes the user update needs.

    ``category`` and ``price`` must be the item table's (empty and 0 for an item
    it does not know), never the client's: the offline replay reads them from
    its item table, and parity depends on both sides seeing the same values.
    """

    user_id: str
    item_id: str
    type: int
    ts: float
    event_id: str = ""
    category: str = ""
    price: float = 0.0


class _Applied(NamedTuple):
    """How the user side applied an event (a duplicate: its first attempt)."""

    type: int
    ts: float
    item: str
    partners: list[str]


@dataclass(slots=True)
class _Group:
    """One event's entries in one shard (deduplicated together)."""

    event: int
    dedupe_key: str | None
    args: list[Any] = field(default_factory=list)
    entries: int = 0


class FeatureStore:
    """All reads and writes of behaviour state in Redis."""

    def __init__(
        self,
        client: RedisClient,
        settings: Settings,
        writer: RedisClient | None = None,
        reader: RedisClient | None = None,
    ) -> None:
        self.client = client
        self.writer = writer if writer is not None else client
        # Request-path reads (connect(..., request_path=True)); default: client.
        self.reader = reader if reader is not None else client
        # The pools hold redis_pool_size connections (plus headroom on a cluster
        # for background calls); the gates keep request-path calls within them.
        self._read_gate = Gate(settings.redis_pool_size, settings.redis_pool_wait_ms / 1000)
        self._write_gate = Gate(settings.redis_pool_size, settings.redis_write_timeout_ms / 1000)
        # Set by the app: a read that times out while the loop lagged is not Redis's fault.
        self.lag: LoopLag | None = None
        self._read_refresh = TopologyRefresh(self.reader)
        self._write_refresh = TopologyRefresh(self.writer)
        self.timeout = settings.redis_timeout_ms / 1000.0
        self.write_timeout = settings.redis_write_timeout_ms / 1000.0
        self.dedupe_ttl = settings.event_dedupe_ttl_secs
        # How long dedupe keys live: a retry is accepted while its (possibly
        # future, by up to MAX_FUTURE_SECS) event time is within dedupe_ttl of
        # now, so the keys outlive that by the skew (0 = no deduplication).
        self.dedupe_key_ttl = int(self.dedupe_ttl + MAX_FUTURE_SECS) if self.dedupe_ttl > 0 else 0
        self.user_ttl = int(settings.user_ttl_days * 86400)
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset_secs)
        # Rows one shard's state string can hold (see DEFAULT_MAX_BULK).
        self.shard_capacity = DEFAULT_MAX_BULK // ITEM_ROW_BYTES
        self._user_script = self.writer.register_script(source("user_event.lua"))
        self._item_script = self.writer.register_script(source("item_event.lua"))
        self._upsert_script = self.writer.register_script(source("item_upsert.lua"))
        self._delete_script = self.writer.register_script(source("item_delete.lua"))
        self.unknown_items = settings.unknown_items
        self._category_script = self.writer.register_script(source("categories.lua"))
        self._read_script = self.client.register_script(source("item_read.lua"))
        self._user_head = [*user_layout(), self.dedupe_key_ttl, self.user_ttl]
        self._layout = item_layout()

    async def fetch_user(self, user_id: str, deadline: float | None = None) -> UserState | None:
        """The user's state in one pipelined round trip; StoreUnavailable on any failure."""
        return (await self.fetch_users([user_id], deadline))[0]

    async def fetch_users(
        self,
        user_ids: Sequence[str],
        deadline: float | None = None,
        read_secs: float | None = None,
    ) -> list[UserState | None]:
        """Several users' states in one pipelined round trip (None = unknown user).

        The read gets ``read_secs`` (default ``redis_timeout_ms``) from when it
        has a connection, and never past ``deadline`` (event-loop time).

        Raises StoreUnavailable when Redis failed: refused, reset, or provably
        slow (``_redis_was_slow``; these count toward the breaker), or the
        circuit is open. Raises Overloaded when the time ran out because of
        this process: no pooled connection in time, the event loop or the CPU
        too busy to have read a reply, or a request deadline spent before the
        read (these never count toward the breaker: an idle Redis must not be
        blamed for a busy worker).
        """
        loop = asyncio.get_running_loop()
        budget = read_secs or self.timeout
        if not self.breaker.allow():
            raise StoreUnavailable("circuit_open")
        pipe = self.reader.pipeline(transaction=False)
        for user_id in user_ids:
            pipe.hgetall(keys.user_state(user_id))
            # Without redis-py's withscores option: no per-item reply callback.
            pipe.execute_command(
                "ZREVRANGE", keys.user_recent(user_id), 0, RECENT_MAX - 1, "WITHSCORES"
            )
            # Members only: banning needs no times (200 scores cost ~40 us of Redis).
            pipe.execute_command("ZREVRANGE", keys.user_purchased(user_id), 0, PURCHASED_MAX - 1)
        started = (0.0, 0.0)
        try:
            # The gate first, with its own wait: a full pool is not a slow Redis.
            async with self._read_gate.slot(deadline or loop.time() + budget):
                started = LoopLag.mark()
                until = loop.time() + budget
                cut_short = deadline is not None and deadline < until
                async with asyncio.timeout_at(deadline if cut_short else until):
                    replies = _legacy_purchases(await pipe.execute(raise_on_error=False))
        except PoolExhausted as exc:
            metrics.REDIS_ERRORS.labels("read", "PoolExhausted").inc()
            raise Overloaded("redis_pool") from exc
        except REDIS_FAILURES as exc:
            timed_out = isinstance(exc, TimeoutError | RedisTimeoutError)
            if timed_out and not self._redis_was_slow(started):
                metrics.REDIS_ERRORS.labels("read", "LoopBehind").inc()
                raise Overloaded("event_loop") from exc
            self.breaker.failure()
            metrics.REDIS_ERRORS.labels("read", type(exc).__name__).inc()
            self._read_refresh.after(exc)
            raise StoreUnavailable("timeout" if timed_out else type(exc).__name__) from exc
        self.breaker.success()
        return [decode_user(*replies[k : k + 3]) for k in range(0, len(replies), 3)]

    def _redis_was_slow(self, started: tuple[float, float]) -> bool:
        """Whether a read that timed out ``started`` (LoopLag.mark()) at least
        proves Redis slow. Had Redis answered at t, this process would have
        read the answer by t plus two loop turns (each no longer than the
        largest lag seen) plus the time its thread waited for a CPU; so Redis
        took at least ``spent - 2 * lag - cpu wait``. Redis's fault when that
        is half the wait or more, and at least REDIS_SLOW_SECS: a hung or
        slow Redis with a responsive process (breaker), not a busy process
        with a quick Redis, nor a read the request's deadline cut to almost
        nothing (overloaded)."""
        spent = time.perf_counter() - started[0]
        if self.lag is None:
            return True
        floor = spent - 2.0 * self.lag.since(started[0]) - self.lag.waited_since(started[0])
        return floor >= max(0.5 * spent, REDIS_SLOW_SECS)

    async def apply_events(
        self, events: Sequence[EventWrite], dedupe: bool = True, unknown_items: str | None = None
    ) -> list[int]:
        """Apply events exactly once each. Returns 1 (applied), 0 (duplicate) or
        UNKNOWN_ITEM (an item no shard holds, refused by ``unknown_items``,
        default Settings.unknown_items; nothing written) per event; raises
        ItemWriteFailed when some could not be (the rest were), and
        StoreUnavailable when Redis failed.

        Round trips: (1) the events' items get their rows (created bare when
        new) in their shards, which refuse items they have no room for; (2) one
        script call per user (pipelines of USERS_PER_PIPELINE) folds the events
        into the user's state and answers each event's co-visit partners;
        (3) the partners' rows, unless (1) gave them already; (4) one script
        call per touched shard counts the events on their items and adds the
        co-visit pairs to both rows. An event whose item got no row stops after
        (1): nothing is written for it.
        """
        policy = unknown_items or self.unknown_items
        epochs: dict[int, str] = {}
        rows, failed = await self._ensure(
            [(e.item_id, "e", -1, 0.0) for e in events], policy, epochs
        )
        results: list[int | None] = [None] * len(events)
        reasons: dict[int, str] = {}
        live: list[int] = []
        for k, e in enumerate(events):
            reason = failed.get(e.item_id)
            if reason == UNKNOWN_REASON:
                results[k] = UNKNOWN_ITEM
            elif reason is not None:
                reasons[k] = reason
            else:
                live.append(k)
        named = await self._apply_users(events, live, dedupe, results)
        # Items and partners by id, resolved to their rows now: a row remembered
        # from earlier could name another item after its shard was rebuilt. A
        # partner no shard holds any more forms no pair. A duplicate's item,
        # type and time are the ones its first attempt counted, whatever the
        # retry says (a retry without ts, or with a future one, has another).
        wanted = {i for n in named.values() for i in (n.item, *n.partners)}
        rows.update(await self._rows_of(wanted - rows.keys(), epochs))
        items = {k: rows[n.item] for k, n in named.items() if n.item in rows}
        partners = {k: sorted(rows[p] for p in n.partners if p in rows) for k, n in named.items()}
        groups = _item_groups(events, named, items, partners, dedupe)
        for shard, reason in (await self._apply_items(groups, epochs)).items():
            for g in groups[shard]:
                reasons[g.event] = reason
        await self._forget_partners(events, named, reasons)
        if reasons:
            for k in reasons:
                results[k] = None
            metrics.REDIS_ERRORS.labels("write", "ItemWriteFailed").inc()
            raise ItemWriteFailed(results, reasons)
        return [int(r or 0) for r in results]

    async def _ensure(
        self,
        items: Sequence[tuple[str, str, int, float]],
        policy: str = "create",
        epochs: dict[int, str] | None = None,
    ) -> tuple[dict[str, int], dict[str, str]]:
        """Rows for (item id, mode, category id, price): 'e' creates a bare item when
        new and ``policy`` allows it, 's' creates it or sets its category and price.
        Returns the rows, and the reason per item that got none (its shard is full
        or broken, or UNKNOWN_REASON: the policy refused it, or it was deleted).
        ``epochs`` gets each answering shard's epoch (see _note_epoch)."""
        by_shard: dict[int, list[tuple[str, str, int, float]]] = {}
        seen: set[tuple[str, str]] = set()
        for item in items:
            if item[1] == "e" and (item[0], "e") in seen:
                continue
            seen.add((item[0], item[1]))
            by_shard.setdefault(shard_of(item[0]), []).append(item)
        calls: list[ScriptCall] = []
        owners: list[tuple[int, list[tuple[str, str, int, float]]]] = []
        head = [*self._layout, STORAGE_FORMAT, self.shard_capacity]
        for shard, chunk_items in sorted(by_shard.items()):
            for start in range(0, len(chunk_items), ITEM_CALL_MAX):
                part = chunk_items[start : start + ITEM_CALL_MAX]
                args: list[Any] = [*head, shard, N_SHARDS, policy]
                for item_id, mode, cat, price in part:
                    args += [item_id, mode, cat, price]
                calls.append((self._upsert_script, keys.shard_keys(shard), args))
                owners.append((shard, part))
        rows: dict[str, int] = {}
        failed: dict[str, str] = {}
        if not calls:
            return rows, failed
        replies = await self._execute(calls, raise_on_error=False)
        for (shard, part), reply in zip(owners, replies, strict=True):
            if isinstance(reply, Exception):
                reason = _shard_failure(shard, reply)
                for item_id, *_ in part:
                    failed[item_id] = reason
                continue
            epoch, answers = reply
            if epochs is not None:
                _note_epoch(epochs, shard, epoch)
            for (item_id, *_), row in zip(part, answers, strict=True):
                if int(row) == -2:
                    failed[item_id] = UNKNOWN_REASON
                elif int(row) < 0:
                    failed[item_id] = f"item shard {shard} is full"
                else:
                    rows[item_id] = int(row)
        return rows, failed

    async def _apply_users(
        self,
        events: Sequence[EventWrite],
        live: list[int],
        dedupe: bool,
        results: list[int | None],
    ) -> dict[int, _Applied]:
        """The user side of the ``live`` events; per event the type, time and item
        it counts for and its co-visit partners (ids). A duplicate comes back
        with its first attempt's, so the item side (deduplicated on its own)
        still gets them when an earlier attempt was cut off between the two."""
        by_user: dict[str, list[int]] = {}
        for k in live:
            by_user.setdefault(events[k].user_id, []).append(k)
        partners: dict[int, _Applied] = {}
        groups = list(by_user.items())
        for start in range(0, len(groups), USERS_PER_PIPELINE):
            chunk = groups[start : start + USERS_PER_PIPELINE]
            calls: list[ScriptCall] = []
            for user_id, positions in chunk:
                ks = keys.user_keys(user_id, [events[k].event_id for k in positions])
                args: list[Any] = list(self._user_head)
                for k in positions:
                    e = events[k]
                    args += [
                        int(e.type),  # redis-py would send an IntEnum as its repr
                        e.ts,
                        e.item_id,
                        e.category,
                        e.price,
                        1 if dedupe and e.event_id else 0,
                    ]
                calls.append((self._user_script, ks, args))
            answers = await self._execute(calls)
            for (_, positions), answer in zip(chunk, answers, strict=True):
                for k, one in zip(positions, answer, strict=True):
                    results[k] = int(one[0])
                    partners[k] = _Applied(
                        int(one[1]), float(one[2]), one[3].decode(), [p.decode() for p in one[4:]]
                    )
        return partners

    async def _forget_partners(
        self, events: Sequence[EventWrite], named: dict[int, _Applied], failed: dict[int, str]
    ) -> None:
        """Drop the partners from the user-side dedupe values of the events whose
        item side is complete (applied now or before, in every shard it
        touches): a retry needs them only while some shard still lacks its
        pairs, and they are up to 19 ids, ~2.5 KB a key for a day. One
        pipeline; if it fails the values keep their partners, which costs
        memory, not correctness (a retry's pairs then meet item-side
        duplicates)."""
        if self.dedupe_key_ttl <= 0:
            return
        done = [
            (events[k], n)
            for k, n in named.items()
            if n.partners and k not in failed and events[k].event_id
        ]
        if not done:
            return
        try:
            until = asyncio.get_running_loop().time() + self.write_timeout
            async with self._write_gate.slot(until), asyncio.timeout_at(until):
                pipe = self.writer.pipeline(transaction=False)
                for e, n in done:
                    # XX: never bring back a key that expired meanwhile.
                    key = keys.user_event_seen(e.user_id, e.event_id)
                    pipe.set(key, dedupe_record(n.type, n.ts, n.item), xx=True, keepttl=True)
                await pipe.execute()
        except REDIS_FAILURES as exc:
            metrics.REDIS_ERRORS.labels("write", type(exc).__name__).inc()
            self._write_refresh.after(exc)

    async def _rows_of(self, items: set[str], epochs: dict[int, str]) -> dict[str, int]:
        """The rows of existing items (one HMGET per shard, one pipeline); items no
        shard holds are left out. ``epochs`` gets each shard's epoch."""
        if not items:
            return {}
        by_shard: dict[int, list[str]] = {}
        for item in sorted(items):
            by_shard.setdefault(shard_of(item), []).append(item)
        try:
            until = asyncio.get_running_loop().time() + self.write_timeout
            async with self._write_gate.slot(until), asyncio.timeout_at(until):
                pipe = self.writer.pipeline(transaction=False)
                for shard, ids in by_shard.items():
                    pipe.hmget(keys.shard_keys(shard)[0], ids)
                    pipe.hget(keys.shard_keys(shard)[3], "epoch")
                replies = await pipe.execute()
        except REDIS_FAILURES as exc:
            metrics.REDIS_ERRORS.labels("write", type(exc).__name__).inc()
            self._write_refresh.after(exc)
            raise StoreUnavailable(type(exc).__name__) from exc
        rows: dict[str, int] = {}
        for (shard, ids), positions, epoch in zip(
            by_shard.items(), replies[::2], replies[1::2], strict=True
        ):
            _note_epoch(epochs, shard, epoch)
            for item, position in zip(ids, positions, strict=True):
                if position is not None:
                    rows[item] = item_row(shard, int(position))
        return rows

    async def _apply_items(
        self, groups: dict[int, list[_Group]], epochs: dict[int, str]
    ) -> dict[int, str]:
        """One script call per shard (split past ITEM_CALL_MAX entries), each
        refused by a shard whose epoch is no longer the one its rows were read
        under; the reason per shard whose call failed (it wrote nothing)."""
        calls: list[ScriptCall] = []
        owners: list[int] = []
        head = [*self._layout, STORAGE_FORMAT, self.dedupe_key_ttl]
        for shard, shard_groups in sorted(groups.items()):
            start = 0
            while start < len(shard_groups):
                end, entries = start, 0
                while end < len(shard_groups) and (
                    end == start or entries + shard_groups[end].entries <= ITEM_CALL_MAX
                ):
                    entries += shard_groups[end].entries
                    end += 1
                part = shard_groups[start:end]
                _, ids, state, meta, dirty = keys.shard_keys(shard)
                item_keys = [state, meta, dirty, ids]
                args: list[Any] = [*head, shard, N_SHARDS, epochs.get(shard, CHANGED)]
                for k, g in enumerate(part):
                    # A group without dedupe still takes a KEYS slot (never read).
                    item_keys.append(g.dedupe_key or f"{meta}:x{k}")
                    args += [1 if g.dedupe_key else 0, g.entries, *g.args]
                calls.append((self._item_script, item_keys, args))
                owners.append(shard)
                start = end
        failed: dict[int, str] = {}
        if not calls:
            return failed
        for shard, reply in zip(
            owners, await self._execute(calls, raise_on_error=False), strict=True
        ):
            if isinstance(reply, Exception):
                failed[shard] = _shard_failure(shard, reply)
        return failed

    async def _execute(self, calls: Sequence[ScriptCall], raise_on_error: bool = True) -> list[Any]:
        """Script calls on the write client within the write deadline. With
        ``raise_on_error`` False a script's error reply stands in its place;
        a failure to reach Redis always raises StoreUnavailable."""
        try:
            until = asyncio.get_running_loop().time() + self.write_timeout
            async with self._write_gate.slot(until), asyncio.timeout_at(until):
                return await run_scripts(self.writer, calls, raise_on_error)
        except REDIS_FAILURES as exc:
            metrics.REDIS_ERRORS.labels("write", type(exc).__name__).inc()
            self._write_refresh.after(exc)
            raise StoreUnavailable(type(exc).__name__) from exc

    async def upsert_items(
        self, items: Sequence[tuple[str, str, float]], catalogue: bool = True
    ) -> None:
        """Set (item_id, category, price) for catalogue items (creating them when new).
        ``catalogue``: then mark every shard as holding a catalogue, so that the
        ``auto`` unknown-item policy refuses events for items outside it (after
        the items are written: an event for one of them is never refused; a
        load in batches marks with its last batch).
        Raises ItemWriteFailed naming the items a shard had no room for."""
        names = list(dict.fromkeys(c for _, c, _ in items if c))
        ids: dict[str, int] = {}
        if names:
            reply = await self._execute(
                [(self._category_script, [keys.CATEGORY_INDEX, keys.CATEGORIES], names)]
            )
            ids = dict(zip(names, (int(i) for i in reply[0]), strict=True))
        _, failed = await self._ensure(
            [(item_id, "s", ids.get(c, -1), float(price)) for item_id, c, price in items]
        )
        if failed:
            index = {item_id: k for k, (item_id, _, _) in enumerate(items)}
            raise ItemWriteFailed(
                [None if i in failed else 1 for i, _, _ in items],
                {index[i]: reason for i, reason in failed.items()},
            )
        if catalogue:
            await self._mark_catalogue()

    async def _mark_catalogue(self) -> None:
        """Every shard's meta says a catalogue was loaded (the flag the ``auto``
        unknown-item policy reads inside the item scripts, shard by shard)."""
        try:
            until = asyncio.get_running_loop().time() + self.write_timeout
            async with self._write_gate.slot(until), asyncio.timeout_at(until):
                pipe = self.writer.pipeline(transaction=False)
                for shard in range(N_SHARDS):
                    pipe.hset(keys.shard_keys(shard)[3], "catalogue", 1)
                await pipe.execute()
        except REDIS_FAILURES as exc:
            self._write_refresh.after(exc)
            raise StoreUnavailable(type(exc).__name__) from exc

    async def item_ids(self) -> list[str]:
        """Every item id Redis holds, shard by shard (HSCAN of the id indexes:
        no rows read, no long command)."""
        out: list[str] = []
        for shard in range(N_SHARDS):
            async for item, _ in self.writer.hscan_iter(keys.shard_keys(shard)[0], count=1000):
                out.append(item.decode() if isinstance(item, bytes) else str(item))
        return out

    async def delete_items(self, item_ids: Sequence[str]) -> list[bool]:
        """Delete items (``lua/item_delete.lua``): per id whether a shard held it.
        Each shard touched gets a new epoch, so every serving process reloads its
        items (docs/storage.md); raises ItemWriteFailed naming the ids of a shard
        that refused (it wrote nothing)."""
        by_shard: dict[int, list[int]] = {}
        for k, item_id in enumerate(item_ids):
            by_shard.setdefault(shard_of(item_id), []).append(k)
        calls: list[ScriptCall] = []
        head = [*self._layout, STORAGE_FORMAT]
        for shard, positions in sorted(by_shard.items()):
            args = [*head, shard, *(item_ids[k] for k in positions)]
            calls.append((self._delete_script, keys.shard_keys(shard), args))
        done: list[bool | None] = [None] * len(item_ids)
        failed: dict[int, str] = {}
        replies = await self._execute(calls, raise_on_error=False) if calls else []
        for (shard, positions), reply in zip(sorted(by_shard.items()), replies, strict=True):
            for j, k in enumerate(positions):
                if isinstance(reply, Exception):
                    failed[k] = _shard_failure(shard, reply)
                else:
                    done[k] = bool(int(reply[j]))
        if failed:
            raise ItemWriteFailed([None if d is None else int(d) for d in done], failed)
        return [bool(d) for d in done]

    async def read_items(
        self,
        cursors: Sequence[ShardCursor],
        known_categories: int = 0,
        shards: Sequence[int] | None = None,
    ) -> ItemsRead:
        """Each shard's changes since its cursor (one pipeline, one atomic script per
        shard; ``shards``: only these, default all), then the categories added
        after ``known_categories`` (read last: every category a row names is then
        known)."""
        wanted = range(N_SHARDS) if shards is None else shards
        calls: list[ScriptCall] = []
        for shard in wanted:
            c = cursors[shard]
            args = [c.version, c.known, c.epoch, STORAGE_FORMAT, ITEM_ROW_BYTES, DELTA_MAX_ROWS]
            _, ids, state, meta, dirty = keys.shard_keys(shard)
            calls.append((self._read_script, [meta, ids, state, dirty], args))
        replies = await run_scripts(self.client, calls)
        cats = await self.client.lrange(keys.CATEGORIES, known_categories, -1)

        def decode() -> ItemsRead:
            return ItemsRead(
                [
                    decode_shard(shard, cursors[shard], reply)
                    for shard, reply in zip(wanted, replies, strict=True)
                ],
                [c.decode() if isinstance(c, bytes) else c for c in cats],
            )

        # Decoding ids is CPU work: off the event loop.
        return await asyncio.to_thread(decode)

    async def load_items(self, shards_per_read: int = 8) -> tuple[ItemTable, ItemsRead]:
        """Every item into a new table, a few shards at a time: the table is sized
        once (from the shards' counts) and each read's rows are copied into it,
        so a catalogue of millions needs little more than the table's memory.
        Also returns what was read, rows dropped (cursors, epoch, version)."""
        pipe = self.client.pipeline(transaction=False)
        for shard in range(N_SHARDS):
            pipe.llen(keys.shard_keys(shard)[1])
        counts = [int(c) for c in await pipe.execute()]
        table = ItemTable()
        await asyncio.to_thread(table.reserve, rows_for(counts))
        cursors = fresh_cursors()
        summary: list[ShardRead] = []
        for start in range(0, N_SHARDS, shards_per_read):
            part = range(start, min(start + shards_per_read, N_SHARDS))
            read = await self.read_items(cursors, 0, part)
            await asyncio.to_thread(place_full, table, read.shards)
            summary += [replace(s, rows=s.rows[:0]) for s in read.shards]
        cats = await self.client.lrange(keys.CATEGORIES, 0, -1)
        for c in cats:
            table.category_id(c.decode() if isinstance(c, bytes) else c)
        return table, ItemsRead(summary, [])

    async def item_table(self) -> ItemTable:
        """Every item, read into a new table (tools and tests; the service keeps
        its table current with ``read_items``, see recsvc.service.itemcache)."""
        return (await self.load_items())[0]

    async def check_format(self) -> None:
        """Claim an empty Redis for this storage format, or raise IncompatibleStore
        when it holds data in another one."""
        found = await self.writer.get(keys.FORMAT_KEY)
        if found is None:
            if await self.writer.exists(keys.LEGACY_ITEM_IDS):
                raise IncompatibleStore(1)  # data from before the marker existed
            await self.writer.set(keys.FORMAT_KEY, STORAGE_FORMAT, nx=True)
            found = await self.writer.get(keys.FORMAT_KEY)
        version = int(found or 0)
        if version != STORAGE_FORMAT:
            raise IncompatibleStore(version)
        await self.read_limits()

    async def read_limits(self) -> None:
        """The rows a shard can hold, from Redis's proto-max-bulk-len where CONFIG
        may be read (managed Redis often forbids it: then the 512 MiB default)."""
        try:
            found = await self.writer.config_get("proto-max-bulk-len")
        except REDIS_FAILURES:
            return
        values = list(found.values()) if isinstance(found, dict) else []
        if values and str(values[0]).isdigit():
            self.shard_capacity = int(str(values[0])) // ITEM_ROW_BYTES

    async def aclose(self) -> None:
        """Stop background topology refreshes, then close both clients."""
        await self._read_refresh.stop()
        await self._write_refresh.stop()
        await self.client.aclose()
        if self.writer is not self.client:
            await self.writer.aclose()
        if self.reader is not self.client:
            await self.reader.aclose()

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout * 4):
                if isinstance(self.client, RedisCluster):  # every master, not one
                    return bool(await self.client.ping(target_nodes=RedisCluster.PRIMARIES))
                return bool(await self.client.ping())
        except REDIS_FAILURES:
            return False


def _item_groups(
    events: Sequence[EventWrite],
    named: dict[int, _Applied],
    items: dict[int, int],
    partners: dict[int, list[int]],
    dedupe: bool,
) -> dict[int, list[_Group]]:
    """Each event's item-side entries (``items``: event -> its item's row), with
    the type and time the user side applied (``named``), grouped by shard and
    event, in event order: its item's counters and pairs ('e'), each
    partner's pair ('p')."""
    groups: dict[int, list[_Group]] = {}
    for k in sorted(items):
        e, row, n = events[k], items[k], named[k]
        pair_ts = covisit_bucket(n.ts) * COVISIT_BUCKET_SECS
        mine: dict[int, _Group] = {}
        own = ["e", row, n.type, n.ts, pair_ts, len(partners[k]), *partners[k]]
        for shard, entry in [
            (row % N_SHARDS, own),
            *((p % N_SHARDS, ["p", p, row, pair_ts]) for p in partners[k]),
        ]:
            g = mine.get(shard)
            if g is None:
                seen = dedupe and e.event_id
                key = keys.shard_event_seen(shard, e.user_id, e.event_id) if seen else None
                g = mine[shard] = _Group(k, key)
                groups.setdefault(shard, []).append(g)
            g.args += entry
            g.entries += 1
    return groups


# No shard's epoch: rows of one shard were read under two epochs (items were
# deleted in between), so the item-side script refuses the call.
CHANGED = "changed"


def _note_epoch(epochs: dict[int, str], shard: int, epoch: bytes | str | None) -> None:
    """Record the epoch a shard's rows were read under (CHANGED after two)."""
    value = epoch.decode() if isinstance(epoch, bytes) else (epoch or "")
    if epochs.setdefault(shard, value) != value:
        epochs[shard] = CHANGED


def _legacy_purchases(replies: list[Any]) -> list[Any]:
    """A user read's replies, the purchases of a user whose purchased key is
    still a set (written before purchases were capped) read as none: the
    user's next event makes it a capped sorted set. Any other error reply
    raises, as ``execute()`` would have."""
    for k, reply in enumerate(replies):
        if isinstance(reply, ResponseError):
            if k % 3 == 2 and str(reply).startswith("WRONGTYPE"):
                replies[k] = []
            else:
                raise reply
    return replies


def _shard_failure(shard: int, exc: Exception) -> str:
    """What to tell a client about a shard that refused a write."""
    if isinstance(exc, ResponseError):
        return f"item shard {shard} refused the write: {str(exc)[:200]}"
    return f"item shard {shard}: {type(exc).__name__}"


async def count_items(client: RedisClient) -> int:
    """How many items Redis holds (every shard's id index, one pipeline)."""
    pipe = client.pipeline(transaction=False)
    for shard in range(N_SHARDS):
        pipe.hlen(keys.shard_keys(shard)[0])
    return int(sum(await pipe.execute()))


def fresh_cursors() -> list[ShardCursor]:
    """A reader that holds nothing yet."""
    return [ShardCursor() for _ in range(N_SHARDS)]


__all__ = [
    "REDIS_FAILURES",
    "UNKNOWN_ITEM",
    "EventWrite",
    "FeatureStore",
    "IncompatibleStore",
    "ItemWriteFailed",
    "RedisClient",
    "UserState",
]
