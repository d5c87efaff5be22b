"""Seeding meets data in an older storage format: a Redis the user gave us is
refused, the demo's own embedded data is rebuilt."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from recsvc.cli.main import _seed_if_empty
from recsvc.store import keys
from recsvc.store.codec import STORAGE_FORMAT
from recsvc.store.feature_store import IncompatibleStore, count_items
from tests.conftest import DataFiles
from tests.helpers import store_settings

pytestmark = pytest.mark.asyncio


async def _format_3(aredis: Redis) -> None:
    """What the unsharded store (format 3) left: one {items} tag."""
    await aredis.set(keys.FORMAT_KEY, 3)
    await aredis.rpush(keys.LEGACY_ITEM_IDS, "old-1", "old-2")
    await aredis.set(f"{keys.ITEM_TAG}:state", b"\0" * 488 * 2)


async def test_a_given_redis_in_the_old_format_is_refused(
    aredis: Redis, redis_url: str, small_files: DataFiles
) -> None:
    await _format_3(aredis)
    with pytest.raises(IncompatibleStore) as info:
        await _seed_if_empty(redis_url, store_settings(), small_files.events, small_files.items)
    assert info.value.found == 3
    assert await aredis.llen(keys.LEGACY_ITEM_IDS) == 2  # untouched


async def test_the_demo_rebuilds_its_own_data_in_the_new_format(
    aredis: Redis, redis_url: str, small_files: DataFiles
) -> None:
    await _format_3(aredis)
    await _seed_if_empty(
        redis_url, store_settings(), small_files.events, small_files.items, rebuild=True
    )
    assert int(await aredis.get(keys.FORMAT_KEY)) == STORAGE_FORMAT
    assert not await aredis.exists(keys.LEGACY_ITEM_IDS)
    assert await count_items(aredis) > 100
