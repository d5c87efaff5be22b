"""The route table: every public route in one place, with the scope of API key
it needs (recsvc.web.access; none: open)."""

from __future__ import annotations

from aiohttp import web

from recsvc.keys import ADMIN, EVENTS, FEATURES, RECOMMEND
from recsvc.web import appkeys, handlers
from recsvc.web.middleware import Handler


def setup_routes(app: web.Application) -> None:
    access = app[appkeys.ACCESS]

    def add(
        method: str, path: str, handler: Handler, scope: str | None, always: bool = False
    ) -> None:
        """``scope`` is needed when API keys are set, or ``always``."""
        if method == "GET":
            route = app.router.add_get(path, handler)  # answers HEAD too, same resource
        else:
            route = app.router.add_route(method, path, handler)
        if scope is not None:
            assert route.resource is not None
            access.protect(route.resource, scope, always)

    add("POST", "/v1/recommendations", handlers.recommend_post, RECOMMEND)
    add("GET", "/v1/recommendations", handlers.recommend_get, RECOMMEND)
    add("GET", "/v1/experiments/{user_id}", handlers.experiments_get, RECOMMEND)
    add("POST", "/v1/events", handlers.events_post, EVENTS)
    # A user's recent items with their times: personal data.
    add("GET", "/v1/users/{user_id}/features", handlers.user_features_get, FEATURES)
    add("POST", "/v1/features", handlers.features_post, FEATURES)
    add("GET", "/healthz", handlers.healthz, None)
    add("GET", "/readyz", handlers.readyz, None)
    # The demo page and the contract hold no data; what the page shows is
    # fetched from the routes above, with a key when keys are set.
    add("GET", "/", handlers.index_get, None)
    add("GET", "/openapi.json", handlers.openapi_get, None)
    add("GET", "/docs", handlers.docs_get, None)
    if not app[appkeys.SETTINGS].metrics_port:  # else on its own listener, without a key
        add("GET", "/metrics", handlers.metrics_get, ADMIN)
    if access.admin:  # off without a key with the admin scope: 404, not 401
        add("GET", "/admin/models", handlers.admin_models_get, ADMIN, always=True)
        add("POST", "/admin/models/reload", handlers.admin_models_reload, ADMIN, always=True)
        add(
            "POST",
            "/admin/experiments/reload",
            handlers.admin_experiments_reload,
            ADMIN,
            always=True,
        )
        add("PUT", "/admin/items", handlers.admin_items_put, ADMIN, always=True)
        add("DELETE", "/admin/items/{item_id}", handlers.admin_items_delete, ADMIN, always=True)
        add("POST", "/admin/items/delete", handlers.admin_items_delete_many, ADMIN, always=True)


def setup_metrics_routes(app: web.Application) -> None:
    """The metrics listener's one route (RECSVC_METRICS_PORT): no key, so that
    port must only be reachable by the scraper."""
    app.router.add_get("/metrics", handlers.metrics_get)
