"""Online feature reads (no HTTP here): named feature values, as the ranker sees them."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from features.candidates import ids_to_index
from features.schema import FEATURE_NAMES, build_matrix, user_features
from features.state import ItemTable, UserState
from recsvc.itemcache import ItemCache
from recsvc.store import FeatureStore


def _json_number(v: float) -> float | None:
    """NaN (a missing feature) becomes JSON null."""
    return None if math.isnan(v) else v


def _category(table: ItemTable, item_id: str) -> str | None:
    row = table.index.get(item_id)
    return (table.category_name(row) or None) if row is not None else None


def _user_entry(
    user_id: str, user: UserState | None, table: ItemTable, item_ids: list[str], now: float
) -> dict[str, Any]:
    state = user or UserState()
    values = user_features(state, table, now)
    entry: dict[str, Any] = {
        "user_id": user_id,
        "known": user is not None,
        "state_age_secs": now - user.last_ts if user is not None else None,
        "features": {k: _json_number(v) for k, v in values.items()},
        "recent": [
            {"item_id": item, "ts": ts, "category": _category(table, item)}
            for item, ts in sorted(state.recent.items(), key=lambda kv: -kv[1])
        ],
    }
    if item_ids:
        idx = ids_to_index(table, item_ids)
        rows = build_matrix(state, table, idx, now, dtype=np.float64).tolist()
        entry["items"] = [
            {
                "item_id": table.ids[i],
                "features": {k: _json_number(v) for k, v in zip(FEATURE_NAMES, row, strict=True)},
            }
            for i, row in zip(idx.tolist(), rows, strict=True)
        ]
    return entry


async def feature_values(
    store: FeatureStore, items: ItemCache, user_ids: list[str], item_ids: list[str]
) -> dict[str, Any]:
    """Features of users (and user x item rows) at this instant, one Redis round trip."""
    users = await store.fetch_users(user_ids)
    now = time.time()
    table = items.view.table
    unknown = [i for i in dict.fromkeys(item_ids) if i not in table.index]
    return {
        "users": [
            _user_entry(u, s, table, item_ids, now) for u, s in zip(user_ids, users, strict=True)
        ],
        "unknown_items": unknown,
    }


async def user_feature_values(
    store: FeatureStore, items: ItemCache, user_id: str
) -> dict[str, Any]:
    """One user's features (GET /v1/users/{id}/features)."""
    body = await feature_values(store, items, [user_id], [])
    return dict(body["users"][0])
