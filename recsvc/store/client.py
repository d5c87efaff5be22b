"""Redis connections: bounded pools without hidden retries, a gate that makes a wait
for a connection visible as such, and cluster topology refresh after a failure."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any, TypeAlias

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterError,
    DataError,
    MaxConnectionsError,
    RedisClusterException,
    RedisError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from recsvc.ops import metrics
from recsvc.settings import Settings
from recsvc.store.redisurl import cluster_kwargs, is_cluster_url

# Either client: RedisCluster is not a Redis subclass (nor ClusterPipeline a Pipeline).
RedisClient: TypeAlias = Redis | RedisCluster
# What a Redis call can fail with. RedisClusterException (cluster unreachable at
# discovery, slots not covered) is not a RedisError.
REDIS_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)
# Connections beyond redis_pool_size for background calls (item refresh,
# readiness pings, exposure writes): the gates hold request-path calls to
# redis_pool_size, so those never find the pool full.
POOL_HEADROOM = 8


class HiredisPacking:
    """Commands packed by hiredis (C) instead of redis-py's Python packer, which
    redis-py's asyncio connections always use (its sync ones already use
    hiredis): the packer was the largest cost of an event write (arguments
    encoded one by one in Python). Same bytes on the wire; the same argument
    types are accepted (str, bytes, int, float) and others refused."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # e.g. "CONFIG GET"
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:
            raise DataError(str(exc)) from None

    def pack_commands(self, commands: Iterable[Any]) -> list[bytes]:
        return [b"".join(self.pack_command(*c)[0] for c in commands)]


_PACKED: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def hiredis_packing(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls`` with HiredisPacking's packer (one subclass per connection class)."""
    if cls not in _PACKED:
        _PACKED[cls] = type(f"Hiredis{cls.__name__}", (HiredisPacking, cls), {})
    return _PACKED[cls]


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
    pool.connection_class = hiredis_packing(pool.connection_class)
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
