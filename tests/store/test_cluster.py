"""recsvc on a real 3-master Redis Cluster (redis+cluster://) on loopback.

The serving, event, store, impression and export tests below are the
standalone suite's own test functions, collected again here with the Redis
fixtures pointed at the cluster;
the rest is what only a cluster can show: one user's read goes to one node,
scripts missing on a node are loaded and the call applied once, URL parsing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from loadtest.cluster import LocalCluster
from recsvc.settings import Settings
from recsvc.store import keys
from recsvc.store.client import RedisClient, TopologyRefresh, connect
from recsvc.web.app import create_app
from tests.ab.test_export import (  # noqa: F401
    test_a_crash_anywhere_in_a_batch_loses_and_repeats_nothing,
    test_one_shot_writes_what_the_service_logged_into_complete_files,
)
from tests.ab.test_impressions import test_every_answer_is_logged_whatever_its_strategy  # noqa: F401
from tests.ab.test_report import (  # noqa: F401
    test_an_outcome_posted_under_another_users_request_id_is_not_counted,
)
from tests.conftest import settings_for
from tests.ops.test_metrics import test_metrics_move_with_one_fallback_and_one_model_answer  # noqa: F401
from tests.store.test_store import (  # noqa: F401
    test_a_delta_read_patches_the_table_exactly,
    test_an_empty_redis_is_claimed_for_this_storage_format,
    test_batch_reports_duplicates_per_event,
    test_event_ids_apply_once_even_concurrently,
    test_redis_and_pure_replay_give_identical_features,
    test_unknown_user_reads_as_none,
)

# The standalone tests that run again here, unchanged. Left out: those that stop,
# pause or replace the Redis server itself (they need one process to act on).
from tests.web.test_events_e2e import (  # noqa: F401
    test_a_user_with_thousands_of_categories_loses_no_events,
    test_a_view_shows_in_the_next_feature_read,
    test_batch_feature_read_names_every_feature,
    test_co_visited_items_become_candidates_and_features,
    test_one_event_id_for_two_users_counts_for_both,
    test_parity_through_http_with_duplicates_and_shuffled_arrival,
    test_purchase_burst_reaches_the_popular_list_within_the_refresh_bound,
    test_purchase_removes_the_item_from_recommendations,
    test_same_event_100_times_concurrently_counts_once,
    test_single_event_and_batch_answers,
    test_unknown_item_gets_a_minimal_record,
)
from tests.web.test_http_e2e import (  # noqa: F401
    test_excluded_items_never_come_back,
    test_explicit_candidates_are_the_only_ones_ranked,
    test_fallback_honours_context_category,
    test_get_form_matches_post,
    test_health_and_readiness,
    test_known_user_gets_n_distinct_model_items,
    test_missing_model_serves_default_with_reason,
    test_purchased_items_never_come_back,
    test_unknown_user_gets_popular_fallback,
)

pytestmark = pytest.mark.asyncio
Client = TestClient[Any, Any]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(masters=3) as c:
        yield c


# These override conftest's fixtures of the same names for this module only.
@pytest.fixture
def redis_url(cluster: LocalCluster) -> str:
    cluster.each("FLUSHALL")
    return cluster.url


@pytest_asyncio.fixture
async def aredis(redis_url: str) -> AsyncIterator[RedisClient]:
    client = connect(redis_url, Settings(), writes=True)
    assert isinstance(client, RedisCluster)
    yield client
    await client.aclose()


def _user_reads(cluster: LocalCluster) -> dict[int, int]:
    """Per master: the user-key read commands it has served since the last reset."""
    out = {}
    for port in cluster.ports:
        with cluster.node(port) as c:
            stats = c.info("commandstats")
        out[port] = sum(
            int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
            for name in ("hgetall", "zrevrange")
        )
    return out


async def test_a_recommendation_reads_one_node_only(cluster: LocalCluster, client: Client) -> None:
    owners = {cluster.owner(keys.user_state(u)) for u in ("u1", "u2", "u3", "u4", "u5", "u6")}
    assert len(owners) > 1  # the users live on different masters
    for user in ("u1", "u2", "u3", "u4", "u5", "u6"):
        cluster.each("CONFIG", "RESETSTAT")
        body = await (await client.post("/v1/recommendations", json={"user_id": user})).json()
        assert body["strategy"] == "model", body
        reads = _user_reads(cluster)
        home = cluster.owner(keys.user_state(user))
        assert reads[home] == 3, reads  # the three user keys, from their one master
        assert sum(reads.values()) == 3, reads


async def test_events_apply_once_after_the_scripts_are_flushed(
    cluster: LocalCluster, client: Client
) -> None:
    events = [
        {"event_id": f"f{k}", "user_id": f"u{k}", "item_id": f"i{k % 7 + 1}", "type": "click"}
        for k in range(1, 40)
    ]
    first = await (await client.post("/v1/events", json={"events": events[:20]})).json()
    assert first["accepted"] == 20
    cluster.each("SCRIPT", "FLUSH")  # every master forgets the scripts (NOSCRIPT next)
    second = await (await client.post("/v1/events", json={"events": events})).json()
    assert (second["accepted"], second["duplicates"]) == (19, 20)
    third = await (await client.post("/v1/events", json={"events": events})).json()
    assert (third["accepted"], third["duplicates"]) == (0, 39)


async def test_serve_with_a_cluster_url_reports_ready(
    cluster: LocalCluster, seeded: RedisClient, model_dir: Path
) -> None:
    app = create_app(settings_for(model_dir, redis_url=cluster.url), cluster.url)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        ready = await (await c.get("/readyz")).json()
        assert ready["status"] == "ready" and ready["checks"]["redis"] is True


async def test_topology_is_refreshed_after_connection_errors_only(cluster: LocalCluster) -> None:
    client = connect(cluster.url, Settings())
    refresh = TopologyRefresh(client)
    try:
        refresh.after(TimeoutError())  # a slow reply says nothing about the slot map
        refresh.after(RedisTimeoutError())
        assert refresh._task is None
        refresh.after(RedisConnectionError("node gone"))
        assert refresh._task is not None
        await refresh.stop()  # cancelled or finished, never left behind
        assert refresh._task.done()
    finally:
        await client.aclose()
