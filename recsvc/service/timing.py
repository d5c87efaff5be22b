"""Per-stage wall-clock timings of one request (for Server-Timing and benchmarks)."""

from __future__ import annotations

import time


class StageTimer:
    """Records the time since the previous mark under a stage name."""

    __slots__ = ("_last", "stages")

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + (now - self._last)
        self._last = now

    def header(self) -> str:
        """The Server-Timing header value (milliseconds)."""
        return ", ".join(f"{k};dur={v * 1000:.3f}" for k, v in self.stages.items())
