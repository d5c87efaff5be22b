"""Every Redis key name recsvc uses. A user's keys share the ``{u:<id>}`` hash tag,
item-side keys the ``{items}`` tag, so each script or read stays in one slot."""

from __future__ import annotations

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


ITEM_INDEX = f"{ITEM_TAG}:idx"
ITEM_IDS = f"{ITEM_TAG}:ids"
ITEM_STATE = f"{ITEM_TAG}:state"
CATEGORY_INDEX = f"{ITEM_TAG}:catidx"
CATEGORIES = f"{ITEM_TAG}:cats"
ITEM_VERSION = f"{ITEM_TAG}:ver"
ITEM_EPOCH = f"{ITEM_TAG}:epoch"
# Item index -> the version that last changed its row (incremental refresh).
ITEM_DIRTY = f"{ITEM_TAG}:dirty"
# The storage format this Redis holds (recsvc.store.feature_store.STORAGE_FORMAT).
FORMAT_KEY = f"{ITEM_TAG}:format"


def item_event_seen(user_id: str, event_id: str) -> str:
    """Scoped by user like the user-side key ('/' cannot occur in ids)."""
    return f"{ITEM_TAG}:e:{user_id}/{event_id}"


def item_keys(events: list[tuple[str, str]]) -> list[str]:
    """KEYS of ``lua/item_event.lua``: the item slot's keys, then one dedupe key per entry."""
    return [
        ITEM_INDEX,
        ITEM_IDS,
        ITEM_STATE,
        CATEGORY_INDEX,
        CATEGORIES,
        ITEM_VERSION,
        ITEM_EPOCH,
        ITEM_DIRTY,
        FORMAT_KEY,
        *(item_event_seen(u, e) for u, e in events),
    ]


def user_keys(user_id: str, event_ids: list[str]) -> list[str]:
    """KEYS of ``lua/user_event.lua``: the user's keys, then one dedupe key per event."""
    return [
        user_state(user_id),
        user_recent(user_id),
        user_purchased(user_id),
        user_visits(user_id),
        *(user_event_seen(user_id, e) for e in event_ids),
    ]


def item_read_keys() -> list[str]:
    """KEYS of ``lua/item_read.lua``."""
    return [ITEM_EPOCH, ITEM_VERSION, ITEM_IDS, CATEGORIES, ITEM_STATE, ITEM_DIRTY, FORMAT_KEY]


# Experiment exposures and the outcomes attributed to them (capped streams).
EXPOSURES = "{ab}:exposures"
OUTCOMES = "{ab}:outcomes"
