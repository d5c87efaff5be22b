"""Issue 17's integrity findings, each reproduced against a real redis-server and
a real HTTP server: the catalogue policy and item deletion (finding 2), all or
nothing item writes at a shard's size limit (1), readiness without item data
(6) and a Redis rolled back under running workers (7)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from features.state import COL_COUNTS, COL_NBR_REF, ItemTable, shard_of
from recsvc.cli.main import main
from recsvc.ops.embedded import EmbeddedRedis, find_binary
from recsvc.service.itemcache import ItemCache
from recsvc.store import keys
from recsvc.store.codec import ITEM_ROW_BYTES, STORAGE_FORMAT
from recsvc.store.feature_store import EventWrite, FeatureStore, ItemWriteFailed, count_items
from recsvc.web import appkeys
from recsvc.web.app import create_app
from tests.conftest import settings_for
from tests.helpers import ids_in_shard, store_settings

pytestmark = pytest.mark.asyncio
Client = TestClient[Any, Any]
TOKEN = "t" * 24
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
MIB = 1024 * 1024


def event(eid: str, user: str, item: str, kind: str = "purchase") -> dict[str, Any]:
    return {"event_id": eid, "user_id": user, "item_id": item, "type": kind}


@pytest_asyncio.fixture
async def shop(seeded: Redis, redis_url: str, model_dir: Path) -> AsyncIterator[Client]:
    """The seeded shop (its catalogue loaded, so RECSVC_UNKNOWN_ITEMS=auto
    refuses items outside it), with admin routes on."""
    app = create_app(settings_for(model_dir, admin_token=TOKEN), redis_url)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        yield c


async def refresh(c: Client) -> None:
    await c.app[appkeys.ITEMS].refresh()


def assert_same_items(worker: ItemTable, store: ItemTable) -> None:
    """The worker's table holds exactly the store's items, each on its row with
    the store's values."""
    assert set(worker.index) == set(store.index)
    for item, row in store.index.items():
        assert worker.index[item] == row, item
        np.testing.assert_array_equal(worker.raw[row], store.raw[row], err_msg=item)


# Finding 2: anyone could create items and push them to the top.


async def test_finding_2_events_cannot_create_items_outside_the_catalogue(
    shop: Client, seeded: Redis
) -> None:
    before = await count_items(seeded)
    batch = [event(f"x{k}", f"invented{k}", "not-in-catalogue") for k in range(30)]
    resp = await shop.post("/v1/events", json={"events": batch})
    body = await resp.json()
    assert resp.status == 200 and body["accepted"] == 0 and body["failed"] == []
    assert [r["index"] for r in body["rejected"]] == list(range(30))
    assert {r["reason"] for r in body["rejected"]} == {"unknown_item"}
    assert {r["field"] for r in body["rejected"]} == {"item_id"}
    assert await count_items(seeded) == before
    assert await FeatureStore(seeded, store_settings()).fetch_user("invented0") is None
    await refresh(shop)
    answer = await (await shop.post("/v1/recommendations", json={"user_id": "newcomer"})).json()
    assert "not-in-catalogue" not in [i["item_id"] for i in answer["items"]]
    single = await shop.post("/v1/events", json=event("x-single", "u1", "not-in-catalogue"))
    error = (await single.json())["error"]
    assert single.status == 409 and error["code"] == "unknown_item"
    assert error["field"] == "item_id"
    # A batch mixing both: the valid event applies, the others are listed.
    mixed = [
        event("m0", "u1", "not-in-catalogue"),
        event("m1", "u1", "i1", "view"),
        {"event_id": "m2", "user_id": "u1", "item_id": "i1", "type": "buy"},
    ]
    body = await (await shop.post("/v1/events", json={"events": mixed})).json()
    assert body["accepted"] == 1
    assert [(r["index"], r["reason"]) for r in body["rejected"]] == [
        (0, "unknown_item"),
        (2, "invalid"),
    ]


async def test_an_admin_upsert_adds_to_the_catalogue_and_events_then_apply(
    shop: Client, seeded: Redis
) -> None:
    new = {"item_id": "fresh-item", "category": "c-new", "price": 12.5}
    assert (await shop.put("/admin/items", json={"items": [new]})).status == 401
    resp = await shop.put("/admin/items", json={"items": [new]}, headers=ADMIN)
    assert resp.status == 200 and (await resp.json()) == {"upserted": 1}
    body = await (await shop.post("/v1/events", json=event("f1", "u1", "fresh-item"))).json()
    assert body["accepted"] == 1 and body["rejected"] == []
    table = await FeatureStore(seeded, store_settings()).item_table()
    assert table.category_name(table.index["fresh-item"]) == "c-new"
    bad = await shop.put(
        "/admin/items", json={"items": [{"item_id": "x", "price": -1}]}, headers=ADMIN
    )
    assert bad.status == 400 and "price" in (await bad.json())["error"]["field"]


async def test_the_policy_is_a_setting(seeded: Redis, redis_url: str, model_dir: Path) -> None:
    app = create_app(settings_for(model_dir, unknown_items="create"), redis_url)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        body = await (await c.post("/v1/events", json=event("p1", "u1", "made-up"))).json()
        assert body["accepted"] == 1
    assert "made-up" in (await FeatureStore(seeded, store_settings()).item_table()).index


async def test_without_a_catalogue_auto_creates_items(
    aredis: Redis, redis_url: str, model_dir: Path
) -> None:
    app = create_app(settings_for(model_dir), redis_url)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        body = await (await c.post("/v1/events", json=event("a1", "u1", "any-item"))).json()
        assert body["accepted"] == 1
    reject = create_app(settings_for(model_dir, unknown_items="reject"), redis_url)
    async with TestClient(TestServer(reject, host="127.0.0.1")) as c:
        resp = await c.post("/v1/events", json=event("a2", "u1", "other-item"))
        assert resp.status == 409
        assert (await resp.json())["error"]["code"] == "unknown_item"


async def test_a_deleted_item_is_never_served_and_workers_agree_with_redis(
    shop: Client, seeded: Redis, redis_url: str, model_dir: Path
) -> None:
    store = FeatureStore(seeded, store_settings())
    await refresh(shop)
    top = await (await shop.post("/v1/recommendations", json={"user_id": "nobody"})).json()
    victim = top["items"][0]["item_id"]
    # The last item of its shard too: the shard's next item goes after it.
    shard = shard_of(victim)
    last = (await seeded.lrange(keys.shard_keys(shard)[1], -1, -1))[0].decode()
    for item in dict.fromkeys([victim, last]):
        resp = await shop.delete(f"/admin/items/{item}", headers=ADMIN)
        assert resp.status == 200 and (await resp.json())["deleted"] is True
    # Many in one call (one reload); repeats count once.
    two = [i for i in ("i3", "i4", "i5", "i6") if i not in (victim, last)][:2]
    batch = {"item_ids": [*two, "never-was", two[0]]}
    many = await shop.post("/admin/items/delete", json=batch, headers=ADMIN)
    assert (await many.json()) == {"deleted": two, "not_found": ["never-was"]}
    again = await shop.delete(f"/admin/items/{victim}", headers=ADMIN)
    assert again.status == 404 and (await again.json())["error"]["code"] == "not_found"
    await refresh(shop)
    for user in ("nobody", "u1", "u2"):
        answer = await (await shop.post("/v1/recommendations", json={"user_id": user})).json()
        assert victim not in [i["item_id"] for i in answer["items"]]
    resp = await shop.post("/v1/events", json=event("d1", "u1", victim))
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "unknown_item"
    # A new item in the same shard after the deletions, then a delta refresh.
    [newcomer] = ids_in_shard(shard, 1, "after-delete")
    await store.upsert_items([(newcomer, "c-x", 3.0)])
    body = await (await shop.post("/v1/events", json=event("d2", "u1", newcomer))).json()
    assert body["accepted"] == 1
    await refresh(shop)
    truth = await store.item_table()
    assert victim not in truth.index and newcomer in truth.index
    assert_same_items(shop.app[appkeys.ITEMS].view.table, truth)
    # A new worker loads the shard with its deleted places.
    app = create_app(settings_for(model_dir), redis_url)
    async with TestClient(TestServer(app, host="127.0.0.1")) as fresh:
        assert_same_items(fresh.app[appkeys.ITEMS].view.table, truth)
        assert (await fresh.get("/readyz")).status == 200


async def test_the_catalogue_command_upserts_and_deletes(
    aredis: Redis, redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = tmp_path / "items.csv"
    items.write_text("item_id,category,price\nk1,shoes,10\nk2,hats,5\n")
    base = ["--redis-url", redis_url, "--data-dir", str(tmp_path)]
    upsert = ["catalogue", "upsert", "--items", str(items), *base]
    assert await asyncio.to_thread(main, upsert) == 0
    assert await asyncio.to_thread(main, ["catalogue", "delete", "k2", "nope", *base]) == 0
    assert "deleted 1 of 2 items" in capsys.readouterr().err
    store = FeatureStore(aredis, store_settings(unknown_items="auto"))
    table = await store.item_table()
    assert set(table.index) == {"k1"} and table.category_name(table.index["k1"]) == "shoes"
    # The catalogue now decides: events cannot create items any more.
    with_policy = await store.apply_events([_write("k9")])
    assert with_policy == [-1]
    # Nothing to delete is an error.
    assert await asyncio.to_thread(main, ["catalogue", "delete", *base]) == 2
    # Items made by events before the catalogue arrived go with --prune.
    await FeatureStore(aredis, store_settings()).apply_events([_write("early")])
    assert await asyncio.to_thread(main, [*upsert, "--prune"]) == 0
    assert "deleted 1 items not in the file" in capsys.readouterr().err
    assert set((await store.item_table()).index) == {"k1", "k2"}
    assert sorted(await store.item_ids()) == ["k1", "k2"]


def _write(item: str) -> EventWrite:
    return EventWrite("u1", item, 0, time.time(), "w1")


# Finding 1: a batch failing half way at a shard's size limit.


async def test_finding_1_a_full_shard_over_http_applies_all_or_nothing_and_once(
    aredis: Redis, redis_url: str, model_dir: Path
) -> None:
    """The review's case over HTTP: proto-max-bulk-len at a shard's size, a batch
    of one known and one new item there. The known item's event applies, the
    new one is listed as failed with nothing of it written; retries count each
    event once; a new worker loads and is ready."""
    await aredis.config_set("proto-max-bulk-len", MIB)
    try:
        store = FeatureStore(aredis, store_settings(unknown_items="create"))
        await store.check_format()
        shard = 11
        fill = ids_in_shard(shard, MIB // ITEM_ROW_BYTES, "full")
        await store.upsert_items([(i, "c", 1.0) for i in fill], catalogue=False)
        [late] = ids_in_shard(shard, 1, "late")
        app = create_app(settings_for(model_dir, unknown_items="create"), redis_url)
        async with TestClient(TestServer(app, host="127.0.0.1")) as c:
            batch = {"events": [event("k1", "buyer", fill[0]), event("k2", "buyer", late)]}
            for _ in range(3):  # the first attempt and two retries
                body = await (await c.post("/v1/events", json=batch)).json()
                assert [f["index"] for f in body["failed"]] == [1]
                assert body["failed"][0]["error"] == f"item shard {shard} is full"
            assert await aredis.hget(keys.shard_keys(shard)[0], late) is None
            table = await store.item_table()
            counted = table.raw[table.index[fill[0]], COL_COUNTS:COL_NBR_REF].sum()
            assert counted == pytest.approx(4.0)  # once, at each of 4 half-lives
            user = await store.fetch_user("buyer")
            assert user is not None and user.n_events == 1
        fresh = create_app(settings_for(model_dir), redis_url)
        async with TestClient(TestServer(fresh, host="127.0.0.1")) as c:
            assert fresh[appkeys.ITEMS].view.table.count == len(fill)
            assert (await c.get("/readyz")).status == 200
    finally:
        await aredis.config_set("proto-max-bulk-len", 512 * MIB)


# Finding 6: ready with no item data.


async def test_finding_6_not_ready_when_the_items_cannot_be_loaded(
    seeded: Redis, redis_url: str, model_dir: Path
) -> None:
    """The review's case: Redis answers and a model is loaded, but the worker
    could not load the items (here a shard in another format): not ready."""
    meta = keys.shard_keys(3)[3]
    await seeded.hset(meta, "format", "99")
    app = create_app(settings_for(model_dir), redis_url)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        resp = await c.get("/readyz")
        body = await resp.json()
        assert body["checks"] == {"redis": True, "model": True, "default_strategy": False}
        assert resp.status == 503 and body["status"] == "not_ready"
        await seeded.hset(meta, "format", str(STORAGE_FORMAT))
        await refresh(c)
        assert (await c.get("/readyz")).status == 200


async def test_an_empty_store_is_ready(aredis: Redis, redis_url: str, model_dir: Path) -> None:
    """A new shop whose events create its items must get traffic to get any."""
    app = create_app(settings_for(model_dir), redis_url)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        assert (await c.get("/readyz")).status == 200


# Finding 7: a Redis rolled back under running workers.


class RestartableRedis:
    """A redis-server on a fixed unix socket whose snapshot survives a kill, so
    it can be restarted from an older state (a restore from backup, or a
    failover to a replica that lagged)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        args = [find_binary(), "--port", "0", "--unixsocket", str(self.socket)]
        args += ["--dir", str(self.root), "--dbfilename", "dump.rdb", "--save", ""]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.socket.unlink(missing_ok=True)


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[RestartableRedis]:
    server = RestartableRedis(tmp_path)
    server.start()
    yield server
    server.kill()


async def _post_until_applied(c: Client, batch: dict[str, Any]) -> None:
    for _ in range(50):  # the first calls after a restart may meet dead connections
        resp = await c.post("/v1/events", json=batch)
        if resp.status == 200 and not (await resp.json())["failed"]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("events never applied")


async def _refresh_until_done(c: Client) -> None:
    for _ in range(50):
        try:
            await refresh(c)
            return
        except Exception:
            await asyncio.sleep(0.05)
    raise AssertionError("refresh never succeeded")


async def test_finding_7_a_rolled_back_redis_makes_workers_reload(
    restartable: RestartableRedis, model_dir: Path
) -> None:
    shard = 23
    before, lost, after = (ids_in_shard(shard, n, p) for n, p in ((1, "a"), (2, "c"), (3, "e")))
    client = Redis.from_url(restartable.url)
    app = create_app(settings_for(model_dir), restartable.url)  # no catalogue: creates
    try:
        async with TestClient(TestServer(app, host="127.0.0.1")) as c:

            def batch(items: list[str], tag: str) -> dict[str, Any]:
                return {"events": [event(f"{tag}{k}", f"u{k}", i) for k, i in enumerate(items)]}

            await _post_until_applied(c, batch(before, "b"))
            await client.save()  # the backup
            await _post_until_applied(c, batch(lost, "l"))
            await refresh(c)
            assert set(lost) <= set(app[appkeys.ITEMS].view.table.index)
            await client.aclose()
            restartable.kill()
            restartable.start()  # from the backup: the lost items are gone
            client = Redis.from_url(restartable.url)
            await _post_until_applied(c, batch(after, "n"))
            await _refresh_until_done(c)
            truth = await FeatureStore(client, store_settings()).item_table()
            assert set(truth.index) == {*before, *after}
            assert_same_items(app[appkeys.ITEMS].view.table, truth)
    finally:
        await client.aclose()


async def test_a_version_that_goes_back_reloads_too(aredis: Redis, redis_url: str) -> None:
    """Same server, an older copy of a shard put back (e.g. RESTORE of a dump):
    its version goes back under the same epoch."""
    store = FeatureStore(aredis, store_settings(unknown_items="create"))
    shard = 31
    first, second = ids_in_shard(shard, 2, "v")
    await store.upsert_items([(first, "c", 1.0)], catalogue=False)
    meta = keys.shard_keys(shard)[3]
    saved = {k: await aredis.dump(k) for k in keys.shard_keys(shard) if await aredis.exists(k)}
    cache = ItemCache(store)
    await cache.refresh()
    await store.upsert_items([(second, "c", 2.0)], catalogue=False)
    await cache.refresh()
    assert second in cache.view.table.index
    for k in keys.shard_keys(shard):
        await aredis.delete(k)
    for k, dumped in saved.items():
        assert dumped is not None
        await aredis.restore(k, 0, dumped)
    assert int(await aredis.hget(meta, "ver") or 0) < cache.cursors[shard].version
    await cache.refresh()
    assert_same_items(cache.view.table, await store.item_table())


# From the outside review of the change above.


async def test_rollback_detection_degrades_where_info_is_denied(aredis: Redis) -> None:
    """Managed Redis often denies INFO (ACL -@dangerous): items still load and
    refresh (only a version that goes back is detected then)."""
    await aredis.execute_command(
        "ACL", "SETUSER", "limited", "on", ">secret-pass", "~*", "&*", "+@all", "-@dangerous"
    )
    store = FeatureStore(aredis, store_settings())
    await store.upsert_items([("i1", "c", 1.0), ("i2", "c", 2.0)], catalogue=False)
    path = aredis.connection_pool.connection_kwargs["path"]
    limited = Redis(unix_socket_path=path, username="limited", password="secret-pass")
    try:
        with pytest.raises(Exception, match="no permissions"):
            await limited.info("server")
        cache = ItemCache(FeatureStore(limited, store_settings()))
        await cache.refresh()
        await store.upsert_items([("i3", "c", 3.0)], catalogue=False)
        await cache.refresh()
        assert_same_items(cache.view.table, await store.item_table())
    finally:
        await limited.aclose()
        await aredis.execute_command("ACL", "DELUSER", "limited")


async def test_a_delete_at_the_size_limit_writes_nothing() -> None:
    """proto-max-bulk-len lowered below a shard's row string: the delete fails
    with nothing written (the id keeps its place, workers keep agreeing), and
    succeeds once there is room."""
    with EmbeddedRedis() as server:
        client = Redis.from_url(server.url)
        try:
            store = FeatureStore(client, store_settings())
            shard = 17
            items = ids_in_shard(shard, MIB // ITEM_ROW_BYTES + 10, "big")
            await store.upsert_items([(i, "c", 1.0) for i in items], catalogue=False)
            _, ids, _, meta, _ = keys.shard_keys(shard)
            before = await client.hgetall(meta)
            await client.config_set("proto-max-bulk-len", MIB)
            with pytest.raises(ItemWriteFailed):
                await store.delete_items([items[-1]])
            assert await client.hget(keys.shard_keys(shard)[0], items[-1]) is not None
            assert (await client.lrange(ids, -1, -1))[0].decode() == items[-1]
            assert await client.hgetall(meta) == before
            await client.config_set("proto-max-bulk-len", 512 * MIB)
            assert await store.delete_items([items[-1]]) == [True]
            assert items[-1] not in (await store.item_table()).index
        finally:
            await client.aclose()


class EventDuringLoad(FeatureStore):
    """Applies ``racer`` through ``other`` when the load writes its items: an
    event arriving in the middle of a catalogue load."""

    racer: EventWrite | None = None
    other: FeatureStore | None = None
    outcome: list[int] | None = None

    async def _ensure(self, *args: Any, **kwargs: Any) -> Any:
        if self.racer is not None and self.other is not None:
            racer, self.racer = self.racer, None
            self.outcome = await self.other.apply_events([racer])
        return await super()._ensure(*args, **kwargs)


async def test_an_event_racing_a_catalogue_load_is_never_refused(aredis: Redis) -> None:
    """The catalogue flag is set after the items are written: an event for an
    item of the load, arriving while it is written, is applied."""
    store = EventDuringLoad(aredis, store_settings(unknown_items="auto"))
    store.other = FeatureStore(aredis, store_settings(unknown_items="auto"))
    store.racer = EventWrite("u1", "cat7", 0, time.time(), "r1")
    await store.upsert_items([(f"cat{k}", "c", 1.0) for k in range(20)])
    assert store.outcome == [1]
    assert await store.apply_events([EventWrite("u", "outsider", 0, time.time(), "o")]) == [-1]


async def test_a_deleted_item_is_not_created_again_by_events(aredis: Redis) -> None:
    """Deleted under the create policy (no catalogue): an event cannot bring it
    back; a catalogue upsert can."""
    store = FeatureStore(aredis, store_settings(unknown_items="create"))
    await store.apply_events([EventWrite("u1", "gone", 3, time.time(), "g1")])
    assert await store.delete_items(["gone"]) == [True]
    assert await store.apply_events([EventWrite("u2", "gone", 3, time.time(), "g2")]) == [-1]
    assert "gone" not in (await store.item_table()).index
    await store.upsert_items([("gone", "back", 5.0)], catalogue=False)
    assert await store.apply_events([EventWrite("u3", "gone", 3, time.time(), "g3")]) == [1]


class DeleteMidway(FeatureStore):
    """Deletes ``victim`` after an event's rows were resolved and its user side
    applied, before its item side: a delete racing the event."""

    victim = ""

    async def _apply_users(self, *args: Any, **kwargs: Any) -> Any:
        named = await super()._apply_users(*args, **kwargs)
        if self.victim:
            await self.delete_items([self.victim])
            self.victim = ""
        return named


async def test_a_delete_racing_an_event_never_writes_into_the_deleted_row(
    aredis: Redis,
) -> None:
    store = DeleteMidway(aredis, store_settings())
    await store.upsert_items([("keep", "c", 1.0), ("doomed", "c", 1.0)], catalogue=False)
    store.victim = "doomed"
    now = time.time()
    with pytest.raises(ItemWriteFailed) as info:
        await store.apply_events([EventWrite("u1", "doomed", 3, now, "d1")])
    assert list(info.value.failed) == [0]
    # The retry: the item is gone, so the event is an unknown item.
    assert await store.apply_events([EventWrite("u1", "doomed", 3, now, "d1")]) == [-1]
    table = await store.item_table()
    state = await aredis.get(keys.shard_keys(shard_of("doomed"))[2])
    rows = np.frombuffer(state or b"", "<f8").reshape(-1, table.raw.shape[1])
    assert not rows[:, COL_COUNTS:COL_NBR_REF].any()  # nothing counted on the empty row
    cache = ItemCache(store)
    await cache.refresh()
    assert_same_items(cache.view.table, table)
