"""Every Redis key name recsvc uses. A user's keys share the ``{u:<id>}`` hash tag,
an item shard's keys its shard tag (``codec.SHARD_TAGS``), the catalogue-wide
keys (categories, format marker) the ``{items}`` tag, so each script or read
stays in one slot."""

from __future__ import annotations

from recsvc.store.codec import SHARD_TAGS

ITEM_TAG = "{items}"


def user_state(user_id: str) -> str:
    return f"{{u:{user_id}}}:s"


def user_recent(user_id: str) -> str:
    return f"{{u:{user_id}}}:r"


def user_purchased(user_id: str) -> str:
    return f"{{u:{user_id}}}:p"


def user_visits(user_id: str) -> str:
    """Co-visitation buckets: members '<bucket>|<item>' scored by bucket."""
    return f"{{u:{user_id}}}:v"


def user_event_seen(user_id: str, event_id: str) -> str:
    return f"{{u:{user_id}}}:e:{event_id}"


# The catalogue's category vocabulary (names by id, id by name) and the storage
# format this Redis holds (recsvc.store.codec.STORAGE_FORMAT).
CATEGORIES = f"{ITEM_TAG}:cats"
CATEGORY_INDEX = f"{ITEM_TAG}:catidx"
FORMAT_KEY = f"{ITEM_TAG}:format"
# Where formats 1 to 3 kept every item id: data from before the format marker.
LEGACY_ITEM_IDS = f"{ITEM_TAG}:ids"


def shard_keys(shard: int) -> list[str]:
    """One item shard's keys (all under its hash tag, codec.SHARD_TAGS):
    id -> position hash, ids by position list, packed rows string, meta hash
    (epoch, version, format), dirty zset (position scored by the version that
    last changed its row)."""
    tag = SHARD_TAGS[shard]
    return [f"{tag}:idx", f"{tag}:ids", f"{tag}:state", f"{tag}:meta", f"{tag}:dirty"]


def shard_event_seen(shard: int, user_id: str, event_id: str) -> str:
    """An event's item-side dedupe key in one shard (scoped by user like the
    user-side key; '/' cannot occur in ids)."""
    return f"{SHARD_TAGS[shard]}:e:{user_id}/{event_id}"


def user_keys(user_id: str, event_ids: list[str]) -> list[str]:
    """KEYS of ``lua/user_event.lua``: the user's keys, then one dedupe key per event."""
    return [
        user_state(user_id),
        user_recent(user_id),
        user_purchased(user_id),
        user_visits(user_id),
        *(user_event_seen(user_id, e) for e in event_ids),
    ]


# Every answered recommendation (sampled; those inside experiments are the
# exposures) and the outcomes attributed to them (capped streams).
IMPRESSIONS = "{ab}:impressions"
OUTCOMES = "{ab}:outcomes"
# Exposures as written before impressions (one field per attribute, no weights):
# only read, by the report.
LEGACY_EXPOSURES = "{ab}:exposures"
