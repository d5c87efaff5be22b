"""Model roll-out through the running service: admin reload under traffic, refusals
with reasons, several named models, and the admin routes' bearer token."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import lightgbm as lgb
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from recsvc.ranking import models
from recsvc.web.app import create_app
from tests.conftest import settings_for

pytestmark = pytest.mark.asyncio
TOKEN = "s3cret-admin-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Client = TestClient[Any, Any]


@pytest.fixture
def model_root(model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the trained model directory (tests add versions to it)."""
    root = tmp_path / "models"
    shutil.copytree(model_dir, root)
    return root


def _admin_app(model_root: Path, redis_url: str) -> Any:
    # Polling effectively off: the reload under test is the admin route's.
    return create_app(settings_for(model_root, admin_token=TOKEN, model_poll_secs=3600), redis_url)


def _new_version(root: Path, name: str = "ranker") -> Path:
    """A newer version of the trained model, written the way `recsvc train` writes one."""
    [source, *_] = models.versions(root, "ranker")
    booster = lgb.Booster(model_file=str(source / models.MODEL_FILE))
    meta = models.read_meta(source)
    return models.save(root, name, booster, {"metrics": meta["metrics"]})


async def test_admin_routes_are_off_without_a_token(
    seeded: Redis, redis_url: str, model_dir: Path
) -> None:
    app = create_app(settings_for(model_dir), redis_url)  # no key with the admin scope
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        resp = await c.post("/admin/models/reload", headers=AUTH)
        assert resp.status == 404


@pytest.mark.parametrize(
    "header",
    [None, "Bearer wrong-token-wrong-token", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"],
)
async def test_admin_routes_need_the_bearer_token(
    seeded: Redis, redis_url: str, model_root: Path, header: str | None
) -> None:
    async with TestClient(TestServer(_admin_app(model_root, redis_url), host="127.0.0.1")) as c:
        headers = {"Authorization": header} if header else {}
        resp = await c.post("/admin/models/reload", headers=headers)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        text = await resp.text()
        assert TOKEN not in text and "wrong-token" not in text
        assert json.loads(text)["error"]["code"] == "unauthorized"
        assert (await c.get("/admin/models", headers=AUTH)).status == 200


async def test_reload_under_steady_traffic_loses_no_request(
    seeded: Redis, redis_url: str, model_root: Path
) -> None:
    [old] = models.versions(model_root, "ranker")
    statuses: list[int] = []
    seen: list[str] = []
    stop = asyncio.Event()
    async with TestClient(TestServer(_admin_app(model_root, redis_url), host="127.0.0.1")) as c:

        async def stream(worker: int) -> None:
            k = 0
            while not stop.is_set() and k < 2000:
                k += 1
                resp = await c.post(
                    "/v1/recommendations", json={"user_id": f"u{(worker + 4 * k) % 400}"}
                )
                statuses.append(resp.status)
                body = await resp.json()
                if body["model"]:
                    seen.append(body["model"]["version"])

        streams = [asyncio.create_task(stream(w)) for w in range(4)]
        await asyncio.sleep(0.5)
        new = _new_version(model_root)
        resp = await c.post("/admin/models/reload", headers=AUTH)
        assert resp.status == 200
        [outcome] = (await resp.json())["models"]
        assert outcome == {
            "name": "ranker",
            "status": "loaded",
            "version": new.name,
            "previous": old.name,
            "refused_version": None,
            "reason": None,
        }
        before = len(seen)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*streams)
        models_now = await (await c.get("/admin/models", headers=AUTH)).json()
    assert len(statuses) > 100 and set(statuses) == {200}
    assert seen[0] == old.name and set(seen) == {old.name, new.name}
    assert len(seen) - before > 20 and set(seen[before + 8 :]) == {new.name}
    assert [m["version"] for m in models_now["models"]] == [new.name]


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [("corrupt_model", "unreadable model.txt"), ("other_features", "feature names differ")],
)
async def test_a_bad_new_version_is_refused_with_its_reason(
    seeded: Redis, redis_url: str, model_root: Path, breakage: str, reason: str
) -> None:
    [old] = models.versions(model_root, "ranker")
    async with TestClient(TestServer(_admin_app(model_root, redis_url), host="127.0.0.1")) as c:
        bad = _new_version(model_root)
        if breakage == "corrupt_model":
            (bad / models.MODEL_FILE).write_text("tree\nthis is not a LightGBM model\n")
        else:
            meta = models.read_meta(bad)
            meta["feature_names"] = [*meta["feature_names"][:-1], "a_feature_we_do_not_have"]
            (bad / models.META_FILE).write_text(json.dumps(meta))
        resp = await c.post("/admin/models/reload", headers=AUTH)
        assert resp.status == 409
        [outcome] = (await resp.json())["models"]
        assert outcome["status"] == "refused"
        assert outcome["version"] == old.name and outcome["refused_version"] == bad.name
        assert reason in outcome["reason"]
        body = await (await c.post("/v1/recommendations", json={"user_id": "u1"})).json()
        assert body["strategy"] == "model" and body["model"]["version"] == old.name
        listed = await (await c.get("/admin/models", headers=AUTH)).json()
        assert listed["refused"][0]["version"] == bad.name


async def test_several_named_models_are_loaded_at_once(
    seeded: Redis, redis_url: str, model_root: Path
) -> None:
    async with TestClient(TestServer(_admin_app(model_root, redis_url), host="127.0.0.1")) as c:
        other = _new_version(model_root, name="ranker-b")
        resp = await c.post("/admin/models/reload", headers=AUTH)
        assert resp.status == 200
        outcomes = {o["name"]: o for o in (await resp.json())["models"]}
        assert outcomes["ranker"]["status"] == "unchanged"
        assert outcomes["ranker-b"] == {
            "name": "ranker-b",
            "status": "loaded",
            "version": other.name,
            "previous": None,
            "refused_version": None,
            "reason": None,
        }
        listed = await (await c.get("/admin/models", headers=AUTH)).json()
        assert listed["default"] == "ranker"
        assert [m["name"] for m in listed["models"]] == ["ranker", "ranker-b"]
