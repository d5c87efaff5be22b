"""The one place where errors become HTTP statuses, plus the in-flight limit."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from recsvc.errors import InvalidRequest, Overloaded, RecsvcError, StoreUnavailable, Unauthorized

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Domain error class -> (status, code, message for the client, response headers).
# Subclasses match their nearest entry; InvalidRequest brings its own code,
# message and field. Everything else is a 500 with no detail.
_RETRY = {"Retry-After": "1"}
ERROR_TABLE: dict[type[RecsvcError], tuple[int, str, str, dict[str, str] | None]] = {
    InvalidRequest: (400, "invalid_request", "", None),
    Unauthorized: (
        401,
        "unauthorized",
        "a valid bearer token is required",
        {"WWW-Authenticate": 'Bearer realm="recsvc-admin"'},
    ),
    Overloaded: (503, "overloaded", "too many requests in flight", _RETRY),
    # Recommendations fall back instead; writes and feature reads get here.
    # Event ids make a retried write safe.
    StoreUnavailable: (
        503,
        "feature_store_unavailable",
        "the feature store is unavailable; retry",
        _RETRY,
    ),
}
HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    400: "bad_request",
}


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"code": code, "message": message, "field": field}}
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers=headers,
    )


def _lookup(exc: RecsvcError) -> tuple[int, str, str, dict[str, str] | None]:
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return 500, "internal", "internal error", None


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every failure to the JSON error form; a client never sees a traceback."""
    try:
        return await handler(request)
    except RecsvcError as exc:
        status, code, message, headers = _lookup(exc)
        if isinstance(exc, InvalidRequest):
            return error_response(status, exc.code, exc.message, exc.field)
        if isinstance(exc, StoreUnavailable):
            log.warning("feature store unavailable: %s", exc.reason, exc_info=exc.__cause__)
        elif status >= 500 and headers is None:
            log.error("unmapped domain error", exc_info=exc)
        return error_response(status, code, message, headers=headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_CODES.get(exc.status, "http_error")
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, code, exc.reason, headers=headers)
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return error_response(500, "internal", "internal error")


def inflight_limit(limit: int) -> Middleware:
    """Answer 503 with Retry-After once ``limit`` requests are in flight in this process."""
    count = 0

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal count
        if count >= limit:
            raise Overloaded()
        count += 1
        try:
            return await handler(request)
        finally:
            count -= 1

    return middleware
