"""The circuit breaker in front of request-path Redis reads."""

from __future__ import annotations

import time


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
