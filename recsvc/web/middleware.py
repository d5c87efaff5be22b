"""The one place where errors become HTTP statuses; API keys, the in-flight cap and
the body limit; CORS; request ids, metrics and the per-request log line."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from recsvc.errors import (
    BodyTimeout,
    Forbidden,
    InvalidRequest,
    Overloaded,
    RecsvcError,
    StoreUnavailable,
    Unauthorized,
    UnknownItem,
)
from recsvc.ops import metrics
from recsvc.web.access import API_KEY, Access, browser_path
from recsvc.web.frontdoor import ARRIVED, OVERLOADED_MESSAGE

log = logging.getLogger(__name__)
access_log = logging.getLogger("recsvc.access")

# The request id: the caller's X-Request-Id when it is a sane token, else ours.
REQUEST_ID = web.RequestKey("request_id", str)
# Whether REQUEST_ID came from the caller (then it is not trusted to be unique).
FROM_CALLER = web.RequestKey("request_id_from_caller", bool)
# Event-loop time by which the request must be answered (RECSVC_REQUEST_DEADLINE_MS).
DEADLINE = web.RequestKey("deadline", float)
# What the handler served, for the request's log line (strategy, variants, reason).
SERVED = web.RequestKey("served", dict[str, Any])
REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Status recorded for a request cancelled before its answer (nginx's convention).
CLIENT_CLOSED = 499
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
# Never shed: a scrape or a probe must answer when the service is busiest.
UNSHED = frozenset({"/metrics", "/healthz", "/readyz"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Domain error class -> (status, code, message for the client, response headers).
# Subclasses match their nearest entry; InvalidRequest brings its own code,
# message and field. Everything else is a 500 with no detail.
_RETRY = {"Retry-After": "1"}
ERROR_TABLE: dict[type[RecsvcError], tuple[int, str, str, dict[str, str] | None]] = {
    InvalidRequest: (400, "invalid_request", "", None),
    UnknownItem: (409, "unknown_item", "", None),
    Unauthorized: (
        401,
        "unauthorized",
        "a valid API key is required (Authorization: Bearer <key>)",
        {"WWW-Authenticate": 'Bearer realm="recsvc"'},
    ),
    # The message and WWW-Authenticate name the scope (RFC 6750 insufficient_scope).
    Forbidden: (403, "insufficient_scope", "", None),
    Overloaded: (503, "overloaded", OVERLOADED_MESSAGE, _RETRY),
    # The connection is closed (after recsvc.web.server.LINGERING_SECS): the rest of
    # the body may still be on its way.
    BodyTimeout: (408, "body_timeout", "the request body did not arrive in time", None),
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


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The handler's answer, with every failure mapped to the JSON error form; a
    client never sees a traceback."""
    try:
        return await handler(request)
    except RecsvcError as exc:
        status, code, message, headers = _lookup(exc)
        if isinstance(exc, InvalidRequest):
            return error_response(status, exc.code, exc.message, exc.field)
        if isinstance(exc, Forbidden):
            challenge = f'Bearer realm="recsvc", error="insufficient_scope", scope="{exc.scope}"'
            return error_response(
                status,
                code,
                f"this API key does not have the {exc.scope} scope",
                headers={"WWW-Authenticate": challenge},
            )
        if isinstance(exc, StoreUnavailable):  # no traceback: outages come in floods
            log.warning("feature store unavailable: %s", exc.reason)
        elif status >= 500 and headers is None:
            log.error("unmapped domain error", exc_info=exc)
        response = error_response(status, code, message, headers=headers)
        if isinstance(exc, BodyTimeout):
            response.force_close()
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_CODES.get(exc.status, "http_error")
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, code, exc.reason, headers=headers)
    except ConnectionResetError:
        raise  # the client went away: observe() counts it, no traceback
    except Exception:
        log.exception(
            "unhandled error",
            extra={"route": _route(request), "request_id": request.get(REQUEST_ID)},
        )
        return error_response(500, "internal", "internal error")


class Guard:
    """One middleware for the checks every request goes through (one layer, not
    four: aiohttp builds the middleware chain per request): the API key and its
    scope (401/403 first, so a caller without a key costs no body read, no
    in-flight place and no admission), the hard in-flight
    cap (503 with Retry-After above ``limit`` requests in this process whose
    body has arrived; probes and scrapes exempt), the body-size limit from
    Content-Length (413 before the handler runs; a chunked body is stopped at
    the same size by aiohttp's ``client_max_size`` while it is read), and the
    mapping of errors to answers.
    ``inflight`` is read by the metrics sampler (recsvc_inflight_requests)."""

    def __init__(
        self,
        limit: int,
        max_bytes: int,
        body_timeout_ms: float,
        deadline_ms: float,
        access: Access,
    ) -> None:
        self.access = access
        self.limit = limit
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout_ms / 1000.0
        self.budget = deadline_ms / 1000.0
        self.inflight = 0
        guard = self._guard

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            return await guard(request, handler)

        self.middleware: Middleware = middleware

    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            self.access.check(request)
        except RecsvcError as exc:
            return await _answer(request, _raising(exc))
        length = request.content_length
        if length is not None and length > self.max_bytes:
            return await _answer(request, self._too_large)
        if not request.content.is_eof():
            # The body is still arriving: wait for it here (aiohttp keeps it for
            # the handler), within body_timeout_ms, before the request counts;
            # then it counts, and its deadline starts, from now.
            failed = await self._read_body(request)
            if failed is not None:
                return failed
            request[ARRIVED] = time.perf_counter()
            request[DEADLINE] = asyncio.get_running_loop().time() + self.budget
        if self.inflight >= self.limit and request.path not in UNSHED:
            metrics.shed("max_inflight")
            return await _answer(request, _overloaded)
        self.inflight += 1
        try:
            return await _answer(request, handler)
        finally:
            self.inflight -= 1

    async def _read_body(self, request: web.Request) -> web.StreamResponse | None:
        """None once the body is in; else the answer: 408 (BodyTimeout, the
        connection closed) or aiohttp's 413 for a chunked body over the limit."""
        try:
            async with asyncio.timeout(self.body_timeout):
                await request.read()
        except TimeoutError:
            return await _answer(request, _raising(BodyTimeout()))
        except web.HTTPException as exc:
            return await _answer(request, _raising(exc))
        return None

    async def _too_large(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPRequestEntityTooLarge(
            max_size=self.max_bytes, actual_size=request.content_length or 0
        )


async def _overloaded(request: web.Request) -> web.StreamResponse:
    raise Overloaded("max_inflight")


def _raising(exc: BaseException) -> Handler:
    """A handler that raises ``exc`` (for _answer's mapping)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        raise exc

    return handler


# Authorization: a page may send a key with the recommend and events scopes only
# (what a page holds is public); the routes of other scopes never answer browsers.
CORS_ALLOW_HEADERS = "Authorization, Content-Type, X-Request-Id, X-Recsvc-Flags"
CORS_EXPOSE_HEADERS = "X-Request-Id, Server-Timing, Retry-After"


def cors(origins: list[str]) -> Middleware:
    """CORS for the frontend's origins: answers preflights (204, or 403 for an
    origin not on the list) and marks answers readable by an allowed origin, on
    the routes a browser may call (access.browser_path: recommendations, a
    user's variants, events); features, metrics and admin routes are never
    opened to browsers. Credentials (cookies) are never allowed; an API key is
    sent as a header the page sets, and a page's key is public."""
    allowed = frozenset(origins)
    any_origin = "*" in allowed

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None or not browser_path(request.path):
            return await handler(request)
        ok = any_origin or origin in allowed
        value = "*" if any_origin else origin
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if not ok:
                return error_response(403, "origin_not_allowed", "this origin may not call recsvc")
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Origin": value,
                    "Access-Control-Allow-Methods": "GET, POST",
                    "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
                    "Access-Control-Max-Age": "600",
                    "Vary": "Origin",
                },
            )
        response = await handler(request)
        if ok:
            response.headers["Access-Control-Allow-Origin"] = value
            response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
            response.headers["Timing-Allow-Origin"] = value  # Server-Timing in devtools
            response.headers.add("Vary", "Origin")
        return response

    return middleware


def _route(request: web.Request) -> str:
    """The route template ("/v1/users/{user_id}/features"): bounded label values."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def observe(sample: float, slow_ms: float, deadline_ms: float) -> Middleware:
    """Outermost middleware: request id in and out, latency histogram per route and
    status, and one JSON log line for a ``sample`` fraction of requests plus every
    5xx and every request slower than ``slow_ms``.

    The log line goes through a queue to a writer thread (``recsvc.ops.logs``), so
    the event loop only builds a small record.
    """

    budget = deadline_ms / 1000.0

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        # The deadline counts from arrival (recsvc.web.frontdoor.stamp_arrivals) when known.
        arrived = request.get(ARRIVED, start)
        request[DEADLINE] = asyncio.get_running_loop().time() + budget - (start - arrived)
        sent = request.headers.get(REQUEST_ID_HEADER)
        from_caller = bool(sent and _REQUEST_ID_OK.fullmatch(sent))
        request_id = sent if sent and from_caller else os.urandom(8).hex()
        request[REQUEST_ID] = request_id
        request[FROM_CALLER] = from_caller
        status = 500
        try:
            response = await handler(request)
            status = response.status
            response.headers[REQUEST_ID_HEADER] = request_id
            return response
        except web.HTTPException as exc:  # < 400 only: errors() answers the rest
            status = exc.status
            exc.headers[REQUEST_ID_HEADER] = request_id
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        except ConnectionResetError:
            # The client went away (e.g. closed the socket half way through its
            # body): nothing to answer, no traceback, not a server error. The
            # answer is never sent; aiohttp drops it quietly.
            status = CLIENT_CLOSED
            return web.Response(status=CLIENT_CLOSED)
        finally:
            elapsed = time.perf_counter() - arrived
            route = _route(request)
            method = request.method if request.method in METHODS else "other"
            metrics.observe_http(route, method, status, elapsed)
            # Errors are always logged, but not 503s: sheds and Redis outages come
            # in floods, and are counted in the metrics.
            forced = status >= 500 and status != 503
            if forced or elapsed * 1000.0 >= slow_ms or random.random() < sample:
                served = request.get(SERVED, {})
                access_log.info(
                    "request",
                    extra={
                        "request_id": request_id,
                        "method": method,
                        "route": route,
                        "status": status,
                        "latency_ms": round(elapsed * 1000.0, 3),
                        "key": request.get(API_KEY),
                        **served,
                    },
                )

    return middleware
