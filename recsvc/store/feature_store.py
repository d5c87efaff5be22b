"""The Redis feature store: one-round-trip user reads, atomic Lua updates, item snapshots."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeAlias

import numpy as np
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterError,
    MaxConnectionsError,
    NoScriptError,
    RedisClusterException,
    RedisError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from features.events import (
    CATEGORY_HALF_LIFE,
    CATEGORY_WEIGHTS,
    COVISIT_BUCKET_ITEMS,
    COVISIT_BUCKET_SECS,
    COVISIT_HALF_LIFE,
    COVISIT_KEEP_SECS,
    COVISIT_NEIGHBOURS,
    HALF_LIVES,
    N_COUNTERS,
    RECENT_MAX,
)
from features.state import ITEM_WIDTH, ItemTable, UserState, covisit_bucket
from recsvc.errors import Overloaded, StoreUnavailable
from recsvc.ops import metrics
from recsvc.ops.looplag import LoopLag
from recsvc.settings import Settings
from recsvc.store import keys
from recsvc.store.redisurl import cluster_kwargs, is_cluster_url


def _script(name: str) -> str:
    return resources.files("recsvc.store").joinpath("lua", name).read_text()


# Either client: RedisCluster is not a Redis subclass (nor ClusterPipeline a Pipeline).
RedisClient: TypeAlias = Redis | RedisCluster
# What a Redis call can fail with. RedisClusterException (cluster unreachable at
# discovery, slots not covered) is not a RedisError.
REDIS_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)
# Connections beyond redis_pool_size for background calls (item refresh,
# readiness pings, exposure writes): the gates hold request-path calls to
# redis_pool_size, so those never find the pool full.
POOL_HEADROOM = 8


def connect(
    url: str, settings: Settings, writes: bool = False, request_path: bool = False
) -> RedisClient:
    """A client with a bounded pool and no hidden retries.

    ``request_path``: for reads that always run under their own deadline
    (``FeatureStore.fetch_users``), without a socket timeout: redis-py wraps
    every send in ``asyncio.wait_for`` (a task and an extra loop turn) and
    every reply in a timeout context when one is set, which cost more than the
    rest of the read.

    Reads wait briefly for a pooled connection (they fall back instead); the
    separate write client waits up to the write deadline, so a burst of event
    writes queues rather than failing, and never starves the reads.
    ``redis+cluster://`` / ``rediss+cluster://`` give a RedisCluster, whose pools
    (``max_connections`` per node) fail at once when full: FeatureStore gates it.
    """
    wait_ms = settings.redis_write_timeout_ms if writes else settings.redis_pool_wait_ms
    # Deadlines are set per call (asyncio.timeout); this only catches a dead peer.
    socket_timeout: float | None = (
        None
        if request_path
        else max(settings.redis_timeout_ms, settings.redis_write_timeout_ms) / 1000.0
    )
    # Writes may take their whole deadline to connect: a burst of events after
    # a quiet spell opens many connections at once, and a busy event loop
    # makes each handshake slow; failing those would lose a burst to 503s.
    connect_timeout = (
        settings.redis_write_timeout_ms if writes else settings.redis_connect_timeout_ms
    ) / 1000.0
    if is_cluster_url(url):
        return RedisCluster(
            **cluster_kwargs(url),
            # Per node; a full cluster pool fails at once (see POOL_HEADROOM).
            max_connections=settings.redis_pool_size + POOL_HEADROOM,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 0),  # no cluster-level retries either
        )
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=settings.redis_pool_size + POOL_HEADROOM,
        timeout=wait_ms / 1000.0,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(NoBackoff(), 0),
    )
    # from_pool: the client owns the pool, so aclose() also closes its connections.
    return Redis.from_pool(pool)


class Gate:
    """At most ``limit`` request-path operations in flight (each holds <= 1
    connection per node), waiting up to ``wait_s`` for a turn.

    For a cluster client this is the BlockingConnectionPool behaviour that
    RedisCluster lacks; for both it makes a wait for a connection visible as
    such (``waited``), so it is never mistaken for a slow Redis.
    """

    def __init__(self, limit: int, wait_s: float) -> None:
        self._sem = asyncio.Semaphore(limit)
        self._wait_s = wait_s

    @contextlib.asynccontextmanager
    async def slot(self, until: float) -> AsyncIterator[None]:
        """Hold a slot; wait at most ``wait_s`` and never past ``until`` (loop time).
        Raises PoolExhausted when no slot frees up in time."""
        if not self._sem.locked():
            await self._sem.acquire()  # the usual case: no timer needed
        else:
            wait = min(self._wait_s, until - asyncio.get_running_loop().time())
            start = time.perf_counter()
            try:
                async with asyncio.timeout(max(wait, 0.0)):
                    await self._sem.acquire()
            except TimeoutError:
                raise PoolExhausted("no free Redis connection") from None
            finally:
                metrics.POOL_WAIT.observe(time.perf_counter() - start)
        try:
            yield
        finally:
            self._sem.release()


class PoolExhausted(MaxConnectionsError):
    """Every connection of this process's pool was busy until the wait ran out: the
    process has more requests in flight than connections, which says nothing
    about Redis."""


class TopologyRefresh:
    """Re-read a RedisCluster's slot map after a failure to reach a node.

    With no retries, a failing ClusterPipeline never marks the client for
    re-discovery (only a failing single command does), so a read path made of
    pipelines would keep sending a failed-over node's keys to the dead address.
    One refresh at a time, at most once per ``min_interval``, in the background
    (the failed call does not wait for it); a no-op for a standalone client.
    """

    def __init__(self, client: RedisClient, min_interval: float = 1.0) -> None:
        self._client = client if isinstance(client, RedisCluster) else None
        self._min_interval = min_interval
        self._last = -min_interval
        self._task: asyncio.Task[None] | None = None

    def after(self, exc: BaseException) -> None:
        """Refresh after a node could not be reached or the cluster reported a
        topology problem; never after a deadline (a slow reply says nothing about
        the slot map, and a refresh reconnects every pooled connection) or a full
        local pool."""
        if self._client is None:
            return
        if isinstance(exc, TimeoutError | RedisTimeoutError | MaxConnectionsError):
            return
        topology = RedisConnectionError | ConnectionError | RedisClusterException | ClusterError
        if not isinstance(exc, topology):
            return
        now = time.monotonic()
        if (
            self._task is not None and not self._task.done()
        ) or now - self._last < self._min_interval:
            return
        self._last = now
        self._task = asyncio.create_task(self._refresh(self._client))

    @staticmethod
    async def _refresh(client: RedisCluster) -> None:
        with contextlib.suppress(*REDIS_FAILURES):
            await client.nodes_manager.initialize()

    async def stop(self) -> None:
        """Cancel a refresh in progress (before its client is closed)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


ScriptCall: TypeAlias = tuple[AsyncScript, Sequence[Any], Sequence[Any]]


async def run_scripts(client: RedisClient, calls: Sequence[ScriptCall]) -> list[Any]:
    """Script calls in one pipeline (one round trip per node), replies in order.

    EVALSHA goes through execute_command: ClusterPipeline blocks .evalsha() and
    has no script preloading. A NOSCRIPT reply means that call did not run; the
    scripts are loaded (on every primary) and only those calls are sent again.
    """
    pipe = client.pipeline(transaction=False)
    for script, ks, argv in calls:
        pipe.execute_command("EVALSHA", script.sha, len(ks), *ks, *argv)
    replies = list(await pipe.execute(raise_on_error=False))
    missing = [k for k, r in enumerate(replies) if isinstance(r, NoScriptError)]
    if missing:
        for script in {id(calls[k][0]): calls[k][0] for k in missing}.values():
            script.sha = await client.script_load(script.script)
        pipe = client.pipeline(transaction=False)
        for k in missing:
            script, ks, argv = calls[k]
            pipe.execute_command("EVALSHA", script.sha, len(ks), *ks, *argv)
        for k, reply in zip(missing, await pipe.execute(raise_on_error=False), strict=True):
            replies[k] = reply
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


# Version of the Redis layout (keys, packed rows, hash fields). 1: before
# co-visitation (16-wide item rows, decimal user fields, no marker key);
# 2: packed user state, item rows with neighbours, {items}:dirty;
# 3: a fourth half-life (30 days) in the user and item counters.
STORAGE_FORMAT = 3


class IncompatibleStore(Exception):
    """Redis holds recsvc data in another storage format."""

    def __init__(self, found: int) -> None:
        self.found = found
        super().__init__(
            f"Redis holds recsvc data in storage format {found}; this version reads "
            f"format {STORAGE_FORMAT}. Load the data again into an empty Redis "
            "(`recsvc import` or `recsvc seed`), or run the version that wrote it."
        )


# A Redis read is only called slow (a breaker failure) after at least this long.
REDIS_SLOW_SECS = 0.002
# Entries per item-script call: bounds how long one call holds Redis.
ITEM_CALL_MAX = 2_000
# User script calls per pipeline: bounds event-loop and Redis time per step.
USERS_PER_PIPELINE = 100
# An incremental item refresh sends at most this many changed rows; beyond it,
# the whole state string (one GET is cheaper than many GETRANGEs).
DELTA_MAX_ROWS = 20_000
_ROW_BYTES = ITEM_WIDTH * 8


class CircuitBreaker:
    """Opens after N consecutive failures; lets one trial through after a cool-down."""

    def __init__(self, failures: int, reset_secs: float) -> None:
        self.failures_to_open = failures
        self.reset_secs = reset_secs
        self.failures = 0
        self.opened_at: float | None = None

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "open" if time.monotonic() - self.opened_at < self.reset_secs else "half_open"

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        if time.monotonic() - self.opened_at >= self.reset_secs:
            # Half-open: this caller is the trial; others wait for its outcome.
            self.opened_at = time.monotonic()
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.failures_to_open:
            self.opened_at = time.monotonic()


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


@dataclass(frozen=True, slots=True)
class ItemSnapshot:
    """Item data read at one version: all rows (``changed`` None) or only the rows
    at the ``changed`` indices since the reader's version."""

    epoch: str
    version: int
    new_ids: list[str]
    new_categories: list[str]
    raw: np.ndarray
    changed: np.ndarray | None = None


# The user state hash (see lua/user_event.lua): 'x' packed scalars and counters,
# 'an' length-prefixed category names, 'av' their affinities as packed float64.
_USER_SCALARS = struct.Struct(f"<{6 + N_COUNTERS}d")
_NAME_LENGTH = struct.Struct("<I")


def _names(blob: bytes) -> list[str]:
    out, pos = [], 0
    while pos < len(blob):
        (length,) = _NAME_LENGTH.unpack_from(blob, pos)
        pos += _NAME_LENGTH.size
        out.append(blob[pos : pos + length].decode())
        pos += length
    return out


def _pairs(reply: list[Any]) -> Any:
    """(member, score) pairs from a raw WITHSCORES reply: [[m, s], ...] in RESP3,
    [m, s, m, s, ...] in RESP2."""
    if reply and isinstance(reply[0], list):
        return reply
    return zip(reply[::2], reply[1::2], strict=True)


def decode_user(
    state: dict[bytes, bytes], recent: list[Any], purchased: set[bytes]
) -> UserState | None:
    """UserState from the three user keys (``recent`` as ZREVRANGE ... WITHSCORES
    sends it, see _pairs); None when the user has no state."""
    packed = state.get(b"x")
    if not packed:
        return None
    n, ref, last, last_purchase, price_sum, price_n, *counts = _USER_SCALARS.unpack(packed)
    names = _names(state.get(b"an", b""))
    values = struct.unpack(f"<{len(names)}d", state.get(b"av", b""))
    return UserState(
        ref=ref,
        counts=counts,
        category_affinity=dict(zip(names, values, strict=True)),
        recent={i.decode(): float(t) for i, t in _pairs(recent)},
        purchased={p.decode() for p in purchased},
        last_ts=last,
        last_purchase_ts=last_purchase,
        price_sum=price_sum,
        price_n=int(price_n),
        n_events=int(n),
    )


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
        self.user_ttl = int(settings.user_ttl_days * 86400)
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset_secs)
        self._user_script = self.writer.register_script(_script("user_event.lua"))
        self._item_script = self.writer.register_script(_script("item_event.lua"))
        self._read_script = self.client.register_script(_script("item_read.lua"))

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
            pipe.smembers(keys.user_purchased(user_id))
        started = (0.0, 0.0)
        try:
            # The gate first, with its own wait: a full pool is not a slow Redis.
            async with self._read_gate.slot(deadline or loop.time() + budget):
                started = LoopLag.mark()
                until = loop.time() + budget
                cut_short = deadline is not None and deadline < until
                async with asyncio.timeout_at(deadline if cut_short else until):
                    replies = await pipe.execute()
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

    def _user_call(
        self, user_id: str, events: Sequence[EventWrite], dedupe: bool
    ) -> tuple[list[str], list[float | int | str | bytes]]:
        ks = keys.user_keys(user_id, [e.event_id for e in events])
        args: list[float | int | str | bytes] = [
            self.dedupe_ttl,
            self.user_ttl,
            RECENT_MAX,
            CATEGORY_HALF_LIFE,
            COVISIT_BUCKET_SECS,
            COVISIT_BUCKET_ITEMS,
            COVISIT_KEEP_SECS,
            len(HALF_LIVES),
            *HALF_LIVES,
            *CATEGORY_WEIGHTS,
        ]
        for e in events:
            args += [
                int(e.type),  # redis-py would send an IntEnum as its repr
                e.ts,
                e.item_id,
                e.category,
                e.price,
                1 if dedupe and e.event_id else 0,
            ]
        return ks, args

    def _item_call(
        self,
        mode: str,
        events: Sequence[EventWrite],
        dedupe: bool,
        partners: Sequence[list[bytes]] | None = None,
    ) -> tuple[list[str], list[float | int | str | bytes]]:
        ks = keys.item_keys([(e.user_id, e.event_id) for e in events])
        args: list[float | int | str | bytes] = [
            self.dedupe_ttl,
            len(HALF_LIVES),
            *HALF_LIVES,
            COVISIT_NEIGHBOURS,
            COVISIT_HALF_LIFE,
            STORAGE_FORMAT,
        ]
        upsert = mode == "upsert"
        for k, e in enumerate(events):
            # Only the catalogue sets item attributes; an event on an unknown item
            # creates a bare record, as features.state.ItemTable.ensure_item does.
            pairs = partners[k] if partners is not None else []
            args += [
                mode,
                e.item_id,
                int(e.type),  # redis-py would send an IntEnum as its repr
                e.ts,
                e.category if upsert else "",
                e.price if upsert else 0.0,
                1 if dedupe and e.event_id else 0,
                covisit_bucket(e.ts) * COVISIT_BUCKET_SECS,
                len(pairs),
                *pairs,
            ]
        return ks, args

    async def apply_events(self, events: Sequence[EventWrite], dedupe: bool = True) -> list[int]:
        """Apply events: one atomic script call per user and one per item chunk, each
        deduplicating by event id. Returns 1 (applied) or 0 (duplicate) per event.

        Users go in pipelines of USERS_PER_PIPELINE, so a batch of many users
        neither stalls the event loop while encoding nor holds Redis in one go.
        """
        by_user: dict[str, list[int]] = {}
        for k, e in enumerate(events):
            by_user.setdefault(e.user_id, []).append(k)
        applied = [0] * len(events)
        # Co-visitation partners per event, from the user side; a duplicate comes
        # back with its stored partners, so the item side (deduplicated on its own)
        # still gets them when an earlier attempt was cut off between the two.
        partners: list[list[bytes]] = [[] for _ in events]
        groups = list(by_user.items())
        for start in range(0, len(groups), USERS_PER_PIPELINE):
            chunk = groups[start : start + USERS_PER_PIPELINE]
            results = await self._execute(
                [
                    (self._user_script, *self._user_call(u, [events[k] for k in positions], dedupe))
                    for u, positions in chunk
                ]
            )
            for (_, positions), answers in zip(chunk, results, strict=True):
                for k, answer in zip(positions, answers, strict=True):
                    applied[k] = int(answer[0])
                    # Sorted (bytes order = the pure side's str order): which
                    # neighbour a full row keeps can depend on the order.
                    partners[k] = sorted(answer[1:])
        for k in range(0, len(events), ITEM_CALL_MAX):
            part = slice(k, k + ITEM_CALL_MAX)
            ks, args = self._item_call("event", events[part], dedupe, partners[part])
            await self._execute([(self._item_script, ks, args)])
        return applied

    async def _execute(self, calls: Sequence[ScriptCall]) -> list[Any]:
        try:
            until = asyncio.get_running_loop().time() + self.write_timeout
            async with self._write_gate.slot(until), asyncio.timeout_at(until):
                return await run_scripts(self.writer, calls)
        except REDIS_FAILURES as exc:
            metrics.REDIS_ERRORS.labels("write", type(exc).__name__).inc()
            self._write_refresh.after(exc)
            raise StoreUnavailable(type(exc).__name__) from exc

    async def upsert_items(self, items: Sequence[tuple[str, str, float]]) -> None:
        """Set (item_id, category, price) for catalogue items."""
        rows = [
            EventWrite("", item_id, 0, 0.0, "", category, price)
            for item_id, category, price in items
        ]
        ks, args = self._item_call("upsert", rows, False)
        await self._item_script(keys=ks, args=args)

    async def item_snapshot(
        self,
        known_items: int = 0,
        known_categories: int = 0,
        since_version: int = -1,
        epoch: str = "",
    ) -> ItemSnapshot:
        """Ids and categories added since the given counts, and the item rows: all of
        them, or (``since_version`` >= 0) only those changed after that version.
        One atomic script call, so everything is from one version. When the keys'
        epoch is not ``epoch`` (rebuilt since), everything is sent."""
        args: list[int | str] = [
            since_version,
            known_items,
            known_categories,
            _ROW_BYTES,
            DELTA_MAX_ROWS,
            epoch,
            STORAGE_FORMAT,
        ]
        reply = await self._read_script(keys=keys.item_read_keys(), args=args)
        # Copying a large table and decoding its ids is CPU work: off the event loop.
        return await asyncio.to_thread(_decode_snapshot, reply)

    async def check_format(self) -> None:
        """Claim an empty Redis for this storage format, or raise IncompatibleStore
        when it holds data in another one."""
        found = await self.writer.get(keys.FORMAT_KEY)
        if found is None:
            if await self.writer.exists(keys.ITEM_IDS):
                raise IncompatibleStore(1)  # data from before the marker existed
            await self.writer.set(keys.FORMAT_KEY, STORAGE_FORMAT, nx=True)
            found = await self.writer.get(keys.FORMAT_KEY)
        version = int(found or 0)
        if version != STORAGE_FORMAT:
            raise IncompatibleStore(version)

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


def table_from_snapshot(snapshot: ItemSnapshot, previous: ItemTable | None) -> ItemTable:
    """An ItemTable over the snapshot rows, sharing the previous vocabulary when unchanged.

    Rows, and vocabularies when items are added, are copied, never mutated: a
    request may still hold the previous table. A delta snapshot needs the
    previous table it was read against.
    """
    if previous is None:
        if snapshot.changed is not None:
            raise ValueError("a delta snapshot needs the table it was read against")
        return ItemTable(snapshot.new_ids, snapshot.new_categories, snapshot.raw)
    raw = snapshot.raw
    if snapshot.changed is not None:
        raw = np.zeros((previous.n + len(snapshot.new_ids), ITEM_WIDTH))
        raw[: previous.n] = previous.raw
        raw[snapshot.changed] = snapshot.raw
    index, category_index = previous.index, previous.category_index
    ids, cats = previous.ids, previous.categories
    if snapshot.new_ids:
        ids = ids + snapshot.new_ids
        index = dict(index)
        index.update((item, previous.n + k) for k, item in enumerate(snapshot.new_ids))
    if snapshot.new_categories:
        cats = cats + snapshot.new_categories
        category_index = dict(category_index)
        base = len(previous.categories)
        category_index.update((c, base + k) for k, c in enumerate(snapshot.new_categories))
    return ItemTable(ids, cats, raw, index=index, category_index=category_index)


def _decode_snapshot(reply: list[Any]) -> ItemSnapshot:
    """The item read script's reply as an ItemSnapshot (a copy that owns its rows)."""
    read_epoch, version, ids, cats, mode, changed, rows = reply
    raw = np.frombuffer(rows or b"", dtype="<f8").reshape(-1, ITEM_WIDTH).copy()
    return ItemSnapshot(
        epoch=read_epoch.decode(),
        version=int(version),
        new_ids=[i.decode() for i in ids],
        new_categories=[c.decode() for c in cats],
        raw=raw,
        changed=np.asarray([int(i) for i in changed], np.int64) if mode == b"delta" else None,
    )
