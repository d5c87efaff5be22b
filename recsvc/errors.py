"""Domain errors. They carry no HTTP status: ``middleware.py`` maps them.

RecsvcError
├── InvalidRequest            bad client input (names the field)
├── Unauthorized              no API key, or not a configured one
├── Forbidden                 a valid key without the route's scope
├── Overloaded                this process is saturated (never blamed on Redis)
├── BodyTimeout               the body did not arrive in time (slow client)
├── StoreUnavailable          Redis error, timeout or open circuit
└── ModelError
    └── ModelRejected         a model file we refuse to serve
"""

from __future__ import annotations


class RecsvcError(Exception):
    """Base of every error recsvc raises on purpose."""


class InvalidRequest(RecsvcError):
    def __init__(self, message: str, field: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.message = message
        self.field = field
        self.code = code


class UnknownItem(InvalidRequest):
    """A single event naming an item that is not in the catalogue (the unknown-item
    policy refuses to create it): a conflict with the store's state, not a
    malformed request."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="item_id", code="unknown_item")


class Unauthorized(RecsvcError):
    """Missing or unknown API key (the message never echoes what was sent)."""


class Forbidden(RecsvcError):
    """A configured API key without the scope the route needs."""

    def __init__(self, scope: str):
        super().__init__(scope)
        self.scope = scope


class Overloaded(RecsvcError):
    """This process cannot answer in time (too many requests, a lagging event loop,
    no free Redis connection); the client should retry shortly. Never Redis's fault."""

    def __init__(self, reason: str = "admission"):
        super().__init__(reason)
        self.reason = reason


class BodyTimeout(RecsvcError):
    """The request body did not arrive within ``body_timeout_ms``."""


class StoreUnavailable(RecsvcError):
    """The feature store could not answer in time (reason is a short code)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ModelError(RecsvcError):
    """A model could not be loaded or could not score."""


class ModelRejected(ModelError):
    """A model version that must not serve (wrong schema, unreadable file)."""
