"""Access control: which scope each route needs, and the API key check that the
Guard middleware (and, for recommendations, the front door) makes.

Scopes (recsvc.keys): ``recommend`` (recommendations, a user's variants),
``events``, ``features`` (a user's features: recent items, times — personal
data), ``admin`` (/admin, and /metrics on the main listener). /, /docs,
/openapi.json, /healthz and /readyz are open. Without API keys every route but
/admin is open, as before keys existed.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractResource

from recsvc.errors import Forbidden, Unauthorized
from recsvc.keys import ADMIN, EVENTS, RECOMMEND, KeyRing, digest
from recsvc.ops import metrics

# The name of the key the request came with (for the log line); set when the key
# is valid, whether or not it had the scope.
API_KEY = web.RequestKey("api_key", str)
# The scope the request's key was found to hold (so a second check is skipped).
GRANTED = web.RequestKey("granted_scope", str)

# What a web page may call from a browser (CORS): a key in a page is public, so
# a page may only hold a key with these scopes, and only these routes answer
# browsers. Features and admin routes never do.
BROWSER_SCOPES = frozenset({RECOMMEND, EVENTS})
BROWSER_PATHS = frozenset({"/v1/recommendations", "/v1/events"})
BROWSER_PREFIXES = ("/v1/experiments/",)


def browser_path(path: str) -> bool:
    return path in BROWSER_PATHS or path.startswith(BROWSER_PREFIXES)


class Access:
    """The keys, and each protected route's scope (filled by ``protect``)."""

    def __init__(self, ring: KeyRing) -> None:
        # Keys other than the admin token: the API routes need a key.
        self.enforced = ring.enforced
        self.admin = ring.has_scope(ADMIN)
        # digest -> (name, {granted scope: its request counter}): one dict lookup
        # finds the key, another its scope; nothing is built per request.
        self._granted: dict[bytes, tuple[str, dict[str, Any]]] = {
            d: (k.name, {s: metrics.api_requests(k.name, s) for s in k.scopes})
            for d, k in ring.by_digest.items()
        }
        self.scopes: dict[AbstractResource, str] = {}

    def protect(self, resource: AbstractResource, scope: str, always: bool = False) -> None:
        """Require ``scope`` on every method of ``resource`` when keys are
        enforced, or ``always`` (admin routes: the admin token alone guards them)."""
        if self.enforced or always:
            self.scopes[resource] = scope

    def _grant(self, request: web.BaseRequest, scope: str) -> str | None:
        """None when the request's key holds ``scope`` (counted), else why not."""
        sent = request.headers.get("Authorization")
        if sent is None:
            return "missing"
        scheme, _, credential = sent.partition(" ")
        if scheme.lower() != "bearer":
            return "missing"
        entry = self._granted.get(digest(credential.strip()))
        if entry is None:
            return "invalid"
        request[API_KEY] = entry[0]
        counter = entry[1].get(scope)
        if counter is None:
            return "scope"
        counter.inc()
        request[GRANTED] = scope
        return None

    def allows(self, request: web.BaseRequest, scope: str) -> bool:
        """Whether the request's key holds ``scope`` (a refusal is counted by ``check``)."""
        return self._grant(request, scope) is None

    def check(self, request: web.Request) -> None:
        """Raise Unauthorized (no valid key) or Forbidden (a key without the scope)
        when the request's route needs a scope its key does not hold."""
        scope = self.scopes.get(request.match_info.route.resource)  # type: ignore[arg-type]
        if scope is None or request.get(GRANTED) == scope:
            return
        reason = self._grant(request, scope)
        if reason is None:
            return
        metrics.auth_denied(reason)
        if reason == "scope":
            raise Forbidden(scope)
        raise Unauthorized()
