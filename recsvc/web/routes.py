"""The route table: every public route in one place."""

from __future__ import annotations

from aiohttp import web

from recsvc.web import appkeys, handlers


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/recommendations", handlers.recommend_post)
    app.router.add_get("/v1/recommendations", handlers.recommend_get)
    app.router.add_post("/v1/events", handlers.events_post)
    app.router.add_get("/v1/users/{user_id}/features", handlers.user_features_get)
    app.router.add_post("/v1/features", handlers.features_post)
    app.router.add_get("/v1/experiments/{user_id}", handlers.experiments_get)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/", handlers.index_get)
    app.router.add_get("/metrics", handlers.metrics_get)
    app.router.add_get("/openapi.json", handlers.openapi_get)
    app.router.add_get("/docs", handlers.docs_get)
    if app[appkeys.SETTINGS].admin_token:  # off without a token: 404, not 401
        app.router.add_get("/admin/models", handlers.admin_models_get)
        app.router.add_post("/admin/models/reload", handlers.admin_models_reload)
        app.router.add_post("/admin/experiments/reload", handlers.admin_experiments_reload)
        app.router.add_put("/admin/items", handlers.admin_items_put)
        app.router.add_delete("/admin/items/{item_id}", handlers.admin_items_delete)
