"""Key names are part of the storage contract: pin them byte for byte."""

import zlib
from collections import Counter

from redis.crc import key_slot

from features.state import N_SHARDS, shard_of
from recsvc.store import keys
from recsvc.store.codec import SHARD_TAGS


def test_user_keys_share_one_hash_tag() -> None:
    assert keys.user_keys("u42", ["e1", "e2"]) == [
        "{u:u42}:s",
        "{u:u42}:r",
        "{u:u42}:p",
        "{u:u42}:v",
        "{u:u42}:e:e1",
        "{u:u42}:e:e2",
    ]


def test_an_item_shard_s_keys_share_its_hash_tag() -> None:
    assert keys.shard_keys(0) == [
        "{i0.10}:idx",
        "{i0.10}:ids",
        "{i0.10}:state",
        "{i0.10}:meta",
        "{i0.10}:dirty",
    ]
    assert keys.shard_event_seen(95, "u1", "e9") == f"{SHARD_TAGS[95]}:e:u1/e9"
    assert (keys.CATEGORIES, keys.CATEGORY_INDEX, keys.FORMAT_KEY) == (
        "{items}:cats",
        "{items}:catidx",
        "{items}:format",
    )


def test_shard_tags_are_pinned_and_spread_evenly_over_the_cluster_slots() -> None:
    """The tags are part of the storage format; shard k's tag hashes into the k-th
    of N_SHARDS equal slot ranges, so masters with equal slot ranges hold equal
    numbers of shards (3 masters: 32 each)."""
    assert SHARD_TAGS[:4] == ("{i0.10}", "{i1.137}", "{i2.52}", "{i3.60}")
    assert len(set(SHARD_TAGS)) == N_SHARDS
    slots = [key_slot(f"{tag}:state".encode()) for tag in SHARD_TAGS]
    for k, slot in enumerate(slots):
        assert k * 16384 // N_SHARDS <= slot < (k + 1) * 16384 // N_SHARDS
    for masters in (2, 3, 4, 6):
        per_master = Counter(slot * masters // 16384 for slot in slots)
        assert set(per_master.values()) == {N_SHARDS // masters}, masters


def test_item_shards_follow_a_stable_hash_of_the_id() -> None:
    assert [shard_of(i) for i in ("i1", "item-42", "e-mail@example.com")] == [
        zlib.crc32(b"i1") % N_SHARDS,
        zlib.crc32(b"item-42") % N_SHARDS,
        zlib.crc32(b"e-mail@example.com") % N_SHARDS,
    ]
    assert shard_of("i1") == 43  # pinned: moving items between shards is a format change
