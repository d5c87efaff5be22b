"""Load control for one worker process: when a request arrived, how late the event
loop runs, and which recommendations to admit.

A worker is one event loop on one core. Python runs one request's scoring at a
time, so what makes answers late under load is not Redis but the queue in front
of the CPU. Three pieces keep that queue honest:

- ``recsvc.web.frontdoor.stamp_arrivals``: every request carries the time aiohttp first built it
  (``ARRIVED``), so the deadline and the queue time count from arrival, not from
  when a busy loop got round to the handler.
- ``recsvc.ops.looplag.LoopLag``: how late a timer scheduled every few milliseconds runs. A Redis
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
import time
from collections.abc import Callable


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
