"""Load control for one worker process: when a request arrived, how late the event
loop runs, and which recommendations to admit.

A worker is one event loop on one core. Python runs one request's scoring at a
time, so what makes answers late under load is not Redis but the queue in front
of the CPU. Three pieces keep that queue honest:

- ``stamp_arrivals``: every request carries the time aiohttp first built it
  (``ARRIVED``), so the deadline and the queue time count from arrival, not from
  when a busy loop got round to the handler.
- ``LoopLag``: how late a timer scheduled every few milliseconds runs. A Redis
  read that times out while the loop was late is the process's fault, not
  Redis's: it never counts toward the circuit breaker.
- ``Admission``: an adaptive concurrency limit. It measures what one admitted
  recommendation costs the process (the service time, which grows when the CPU
  is shared or throttled) and admits a request only when the requests ahead of
  it are predicted to finish, with it, inside ``target``
  from its arrival: ``waited + (admitted + 1) * service <= target``. The rest are
  answered at once (503 + Retry-After, or the default strategy with reason
  ``overloaded``). ``cpu`` lets one admitted request compute at a time, so the
  loop returns to its sockets between two requests' scoring and a rejection
  never waits behind a pile of them. Python runs one request's scoring at a
  time anyway, so the lock costs no throughput.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

# perf_counter() when aiohttp built the request (see stamp_arrivals).
ARRIVED = web.RequestKey("arrived", float)


def stamp_arrivals(server: web.Server) -> None:
    """Record on each request the time aiohttp built it from the parsed message.

    That is as early as aiohttp lets an application see a request: the time the
    bytes waited in the socket buffer before the loop read them shows up as
    loop lag instead (``LoopLag``). Must be called before the site starts.
    """
    make = server.request_factory

    def factory(*args: Any) -> web.BaseRequest:
        now = time.perf_counter()
        request = make(*args)
        request[ARRIVED] = now
        return request

    server.request_factory = factory


class LoopLag:
    """Event-loop lag: how late a callback due every ``interval`` seconds runs.

    ``since(t)`` is the worst lag seen from ``t`` (perf_counter) to now, counting
    a tick that is overdue right now. One timer per process; a tick costs a few
    microseconds.
    """

    def __init__(self, interval: float = 0.002, window: float = 2.0) -> None:
        self.interval = interval
        self._ticks: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=max(16, int(window / interval))
        )
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self.on_tick: Callable[[float], None] | None = None

    def start(self) -> None:
        self._due = time.perf_counter() + self.interval
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        now = time.perf_counter()
        lag = max(now - self._due, 0.0)
        self._ticks.append((now, lag))
        if self.on_tick is not None:
            self.on_tick(lag)
        self._due = now + self.interval
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._tick)

    @staticmethod
    def mark() -> tuple[float, float]:
        """Wall and event-loop-thread CPU clocks now, for ``saturated``."""
        return time.perf_counter(), time.thread_time()

    def saturated(self, mark: tuple[float, float]) -> bool:
        """Whether the process was too busy since ``mark`` to blame anything else
        for lost time: the loop's thread ran for half the time or more (callbacks
        of other requests), or the loop ran late by a quarter of it or more (a
        long callback, or the CPU throttled, when the thread cannot run at all)."""
        wall = time.perf_counter() - mark[0]
        if wall <= 0.0:
            return False
        return time.thread_time() - mark[1] >= 0.5 * wall or self.since(mark[0]) >= 0.25 * wall

    def since(self, start: float) -> float:
        """The largest lag observed after ``start`` (perf_counter), now included."""
        now = time.perf_counter()
        worst = max(now - self._due, 0.0) if self._handle is not None else 0.0
        for at, lag in reversed(self._ticks):
            if at < start:
                break
            worst = max(worst, lag)
        return worst


class Admission:
    """The adaptive concurrency limit of recommendations in one process.

    ``service`` estimates what one admitted recommendation costs: an EWMA of
    the wall time of its CPU section (candidates, features, scoring; the turns
    of the loop between those slices excluded). It grows when the CPU is shared
    or throttled, and does not grow with the number of rejections: an estimate
    that counted the work of turning clients away would admit fewer as more
    are turned away, and clients that retry at once would spiral it down.
    Queues other than the CPU section (HTTP, the Redis round trip) are what
    the gap between ``target`` and the request deadline is for.

    A request is admitted when ``waited + (admitted + 1) * service <= target``;
    ``limit`` is the same rule for a request that has not waited.
    """

    def __init__(
        self,
        target: float,
        max_inflight: int,
        initial_service: float = 0.002,
        smoothing: float = 0.05,
    ) -> None:
        self.target = target
        self.max_inflight = max_inflight
        self.service = initial_service
        self.smoothing = smoothing
        self.inflight = 0
        # One admitted request computes at a time (see the module docstring).
        self.cpu = asyncio.Lock()

    @property
    def limit(self) -> int:
        """Requests in flight that still fit in ``target`` (>= 1)."""
        return max(1, min(self.max_inflight, int(self.target / self.service)))

    def admit(self, waited: float) -> bool:
        """Whether a request that has already waited ``waited`` seconds since its
        arrival can be answered in time; counts it in when it can."""
        if self.inflight >= self.max_inflight:
            return False
        # With nothing ahead, a request has the best chance it will ever get.
        if self.inflight and waited + (self.inflight + 1) * self.service > self.target:
            return False
        self.inflight += 1
        return True

    def done(self) -> None:
        """An admitted request answered."""
        self.inflight -= 1

    def computed(self, seconds: float) -> None:
        """An admitted request's CPU section took ``seconds`` (wall time)."""
        self.service += self.smoothing * (seconds - self.service)
