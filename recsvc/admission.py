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
- ``Admission``: an adaptive concurrency limit. It learns what one admitted
  recommendation costs the process from the intervals between completions
  while busy (the service time, which grows when the CPU is shared or
  throttled) and admits a request only when the requests ahead of it are
  predicted to finish, with it, inside ``target``
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
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from recsvc import metrics

# perf_counter() when aiohttp built the request (see stamp_arrivals).
ARRIVED = web.RequestKey("arrived", float)
NOT_ADMITTED = -1.0  # TICKET of a request the front door did not admit
RECOMMEND_PATH = "/v1/recommendations"
OVERLOADED_MESSAGE = "the service is saturated; retry shortly"


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


# Set by the front door (install_front_door) when it admitted the request: the
# admission time (perf_counter). It gives the place back when the request is
# answered, whatever answers it; the handler only sets MISSED.
TICKET = web.RequestKey("admission_ticket", float)
# Set by the handler when an admitted request's deadline passed before it scored.
MISSED = web.RequestKey("admission_missed", bool)
FRONT_DOOR_METHODS = frozenset({"GET", "HEAD", "POST"})
REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def install_front_door(
    server: web.Server, admission: Admission, reject: bool, origins: frozenset[str]
) -> None:
    """Decide admission for recommendations before routing and middlewares.

    A GET, HEAD or POST of RECOMMEND_PATH whose whole body has arrived is
    admitted here or, with ``reject``, answered 503 at once from a prebuilt
    body: no routing, no middleware chain, no exception, a fraction of a
    normal request's cost, which is what keeps turning away twice the
    capacity affordable. The 503 carries Retry-After, the caller's sane
    X-Request-Id (else a new one) and, for an allowed browser ``Origin``
    (``origins``; "*" = any), the CORS headers the middleware would add.
    An admitted request keeps its place until it is answered, by whatever
    answers it (a 405, a 413, the handler). Other requests (a body still
    arriving, other methods and routes) go the normal way; the handler decides
    admission for those. Call after ``stamp_arrivals``.
    """
    handle = server.request_handler
    body = orjson.dumps(
        {"error": {"code": "overloaded", "message": OVERLOADED_MESSAGE, "field": None}}
    )
    any_origin = "*" in origins

    def rejection(request: web.BaseRequest) -> web.Response:
        sent = request.headers.get("X-Request-Id", "")
        headers = {
            "Retry-After": "1",
            "X-Request-Id": sent if REQUEST_ID_OK.fullmatch(sent) else os.urandom(8).hex(),
        }
        origin = request.headers.get("Origin")
        if origin is not None and (any_origin or origin in origins):
            headers["Access-Control-Allow-Origin"] = "*" if any_origin else origin
            headers["Access-Control-Expose-Headers"] = "X-Request-Id, Server-Timing, Retry-After"
            headers["Vary"] = "Origin"
        return web.Response(status=503, body=body, content_type="application/json", headers=headers)

    async def front(request: web.BaseRequest) -> web.StreamResponse:
        if (
            request.path != RECOMMEND_PATH
            or request.method not in FRONT_DOOR_METHODS
            or not request.content.is_eof()
        ):
            return await handle(request)
        now = time.perf_counter()
        ticket = admission.admit(now - request.get(ARRIVED, now))
        if ticket is None:
            metrics.shed("admission")
            if reject:
                elapsed = time.perf_counter() - request.get(ARRIVED, now)
                metrics.observe_http(RECOMMEND_PATH, request.method, 503, elapsed)
                return rejection(request)
            request[TICKET] = NOT_ADMITTED
            return await handle(request)
        request[TICKET] = ticket
        try:
            return await handle(request)
        finally:
            admission.done(ticket, request.get(MISSED, False))

    server.request_handler = front


SCHEDSTAT = Path("/proc/thread-self/schedstat")


def _run_delay() -> float:
    """Seconds the calling thread has spent runnable but not running so far: waiting
    for a CPU another process holds, or for a CPU quota's next period (Linux
    schedstat; 0 where it is not available)."""
    try:
        return int(SCHEDSTAT.read_bytes().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class LoopLag:
    """Event-loop lag: how late a callback due every ``interval`` seconds runs, and
    how long the loop's thread waited for a CPU (read at each tick).

    ``since(t)`` is the worst lag seen from ``t`` (perf_counter) to now, counting
    a tick that is overdue right now; ``saturated(mark)`` says whether the process
    was too busy since ``mark`` to blame anything else for lost time. One timer
    per process; a tick costs a few microseconds.
    """

    def __init__(self, interval: float = 0.005, window: float = 2.0) -> None:
        self.interval = interval
        # (perf_counter, lag, run delay so far) per tick.
        self._ticks: collections.deque[tuple[float, float, float]] = collections.deque(
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
        self._ticks.append((now, lag, _run_delay()))
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
        for lost time: the loop's thread ran for half the time or more (other
        requests' callbacks), the loop ran late by a quarter of it or more (a
        long callback), or the thread waited for a CPU for a quarter of it or more
        (another process on its core, or a CPU quota throttling it: then it
        cannot run at all)."""
        wall = time.perf_counter() - mark[0]
        if wall <= 0.0:
            return False
        if time.thread_time() - mark[1] >= 0.5 * wall or self.since(mark[0]) >= 0.25 * wall:
            return True
        return self.waited_since(mark[0]) >= 0.25 * wall

    def waited_since(self, start: float) -> float:
        """Seconds the loop's thread waited for a CPU from the last tick before
        ``start`` to now (reads schedstat: for the rare cases that need it)."""
        first = None
        for at, _, delay in reversed(self._ticks):
            first = delay
            if at < start:
                break
        return 0.0 if first is None else _run_delay() - first

    def since(self, start: float) -> float:
        """The largest lag observed after ``start`` (perf_counter), now included."""
        now = time.perf_counter()
        worst = max(now - self._due, 0.0) if self._handle is not None else 0.0
        for at, lag, _ in reversed(self._ticks):
            if at < start:
                break
            worst = max(worst, lag)
        return worst


class Admission:
    """The adaptive concurrency limit of recommendations in one process.

    Two estimates of the time one more admitted request adds to the queue:

    - ``service``: the interval between two completions while this process was
      busy (the completing request was admitted before the previous one
      completed, so the process had work all along): what a request costs in
      wall time, all of it (HTTP, Redis client, scoring, and the share of
      turning others away), at the CPU speed the process gets now (shared or
      throttled). Intervals that include idle time are not samples.
    - ``section``: the wall time of the CPU section of requests that scored
      (candidates, features, scoring; the loop's turns between them excluded).
      It follows the CPU speed too, but not the work of rejections.

    The prediction uses ``min(service, SECTION_CAP * section)``. ``service``
    alone spirals when clients retry a 503 at once (wrk, a careless frontend):
    more rejections, a larger estimate, more rejections, down to one request
    at a time. The cap bounds how much rejection work can shrink the limit.
    When an admitted request still misses its deadline, ``section`` was too
    optimistic (or stale: late requests never score, so they never sample
    it): it grows by ``MISS_GROWTH``.

    A request is admitted when ``waited + (ahead + 1) * estimate <= target``;
    ``limit`` is the same rule for a request that has not waited. A burst is
    not an overload (CoDel's insight): while the queue has emptied at least
    once in the last ``INTERVAL`` seconds, the bound is ``burst_target``
    instead (default: ``target``; the app gives 80% of the request deadline),
    so a burst at 70% load is queued within the deadline, not turned away;
    only a standing queue (never empty for a whole interval: more offered than
    served, or more clients than fit) gets the tighter ``target``.
    """

    SECTION_CAP = 2.0
    MISS_GROWTH = 1.1
    INTERVAL = 0.1

    def __init__(
        self,
        target: float,
        max_inflight: int,
        initial_service: float = 0.002,
        smoothing: float = 0.05,
        clock: Callable[[], float] = time.perf_counter,
        burst_target: float | None = None,
    ) -> None:
        self.target = target
        self.burst_target = max(target, burst_target or target)
        # The fewest requests found ahead by an arrival in the current interval,
        # and whether the previous interval's fewest was at least one (standing).
        self._window_start = 0.0
        self._window_min = 0
        self.standing = False
        self.max_inflight = max_inflight
        self.service = initial_service
        self.section = initial_service
        self.smoothing = smoothing
        self.clock = clock
        self.inflight = 0
        self._last_done = 0.0
        # One admitted request computes at a time (see the module docstring).
        self.cpu = asyncio.Lock()

    @property
    def estimate(self) -> float:
        """Seconds one more admitted request adds to the queue."""
        return min(self.service, self.SECTION_CAP * self.section)

    @property
    def limit(self) -> int:
        """Requests in flight that still fit in ``target`` (>= 1)."""
        return max(1, min(self.max_inflight, int(self.target / self.estimate)))

    def admit(self, waited: float) -> float | None:
        """For a request that has already waited ``waited`` seconds since its
        arrival: its admission time (perf_counter) when it can be answered in
        time (it is counted in), else None."""
        ahead = self.inflight
        now = self.clock()
        if now - self._window_start >= self.INTERVAL:
            self.standing = self._window_min >= 1 and now - self._window_start < 2 * self.INTERVAL
            self._window_start, self._window_min = now, ahead
        elif ahead < self._window_min:
            self._window_min = ahead
        if ahead >= self.max_inflight:
            return None
        # With nothing ahead, a request has the best chance it will ever get.
        bound = self.target if self.standing else self.burst_target
        if ahead and waited + (ahead + 1) * self.estimate > bound:
            return None
        self.inflight += 1
        return now

    def done(self, admitted: float, missed: bool = False) -> None:
        """A request admitted at ``admitted`` answered; ``missed``: by the default
        strategy, because its deadline had passed."""
        self.inflight -= 1
        now = self.clock()
        if admitted < self._last_done:  # busy since the previous completion
            self.service += self.smoothing * (now - self._last_done - self.service)
        self._last_done = now
        if missed:
            self.section *= self.MISS_GROWTH

    def computed(self, seconds: float) -> None:
        """A request's CPU section took ``seconds`` (wall time, turns excluded)."""
        self.section += self.smoothing * (seconds - self.section)
