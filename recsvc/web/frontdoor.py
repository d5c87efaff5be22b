"""The front door of a worker: every request is stamped with its arrival time, and
a recommendation whose body has arrived is admitted or refused before routing
(``recsvc.service.admission.Admission`` decides)."""

from __future__ import annotations

import os
import re
import time
from typing import Any

import orjson
from aiohttp import web

from recsvc.keys import RECOMMEND
from recsvc.ops import metrics
from recsvc.service.admission import Admission
from recsvc.web.access import Access

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
    server: web.Server,
    admission: Admission,
    reject: bool,
    origins: frozenset[str],
    access: Access,
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
    admission for those. With API keys (``access``), a recommendation whose
    key does not hold the recommend scope is never admitted here: it goes the
    normal way to its 401 or 403 (middleware.Guard, before the handler), so it
    takes no place in the queue and never gets the default strategy's answer.
    Call after ``stamp_arrivals``.
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
            or (access.enforced and not access.allows(request, RECOMMEND))
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
