"""Event-loop lag and CPU wait of the loop's thread: a Redis read that times out
while the loop was late is the process's fault, not Redis's."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from pathlib import Path

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
