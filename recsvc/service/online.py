"""Online feature reads (no HTTP here): named feature values, as the ranker sees them."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import numpy as np

from features.candidates import ids_to_index
from features.schema import FEATURE_NAMES, build_matrix, user_features
from features.state import ItemTable, UserState
from recsvc.service.itemcache import ItemView
from recsvc.service.recommend import Recommender


def _json_number(v: float) -> float | None:
    """NaN (a missing feature) becomes JSON null."""
    return None if math.isnan(v) else v


def _category(table: ItemTable, item_id: str) -> str | None:
    row = table.index.get(item_id)
    return (table.category_name(row) or None) if row is not None else None


def _user_entry(
    rec: Recommender,
    user_id: str,
    user: UserState | None,
    view: ItemView,
    item_ids: list[str],
    now: float,
) -> dict[str, Any]:
    table = view.table
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
        # With what the candidate sources find for the user under the default
        # model, so the rows are the ones that model would score.
        found = rec.retrieve(state, view, rec.models.current, now)
        rows = build_matrix(state, table, idx, now, dtype=np.float64, retrieval=found).tolist()
        entry["items"] = [
            {
                "item_id": table.ids[i],
                "features": {k: _json_number(v) for k, v in zip(FEATURE_NAMES, row, strict=True)},
            }
            for i, row in zip(idx.tolist(), rows, strict=True)
        ]
    return entry


# A batch read of many users is not a recommendation: it gets the request-path
# Redis deadline per this many users (a user state is up to ~2 KB with 100
# recent items), up to the write deadline.
USERS_PER_READ_DEADLINE = 10


async def feature_values(
    rec: Recommender, user_ids: list[str], item_ids: list[str]
) -> dict[str, Any]:
    """Features of users (and user x item rows) at this instant, one Redis round trip.

    The rows (candidate sources and a feature matrix per user) are built in a
    worker thread: a batch of users x items must not hold up recommendations.
    """
    store = rec.store
    batches = -(-len(user_ids) // USERS_PER_READ_DEADLINE)
    read_secs = min(store.timeout * max(batches, 1), store.write_timeout)
    users = await store.fetch_users(user_ids, read_secs=read_secs)
    now = time.time()
    view = rec.items.view

    def entries() -> list[dict[str, Any]]:
        return [
            _user_entry(rec, u, s, view, item_ids, now)
            for u, s in zip(user_ids, users, strict=True)
        ]

    unknown = [i for i in dict.fromkeys(item_ids) if i not in view.table.index]
    body = await asyncio.to_thread(entries) if item_ids else entries()
    return {"users": body, "unknown_items": unknown}


async def user_feature_values(rec: Recommender, user_id: str) -> dict[str, Any]:
    """One user's features (GET /v1/users/{id}/features)."""
    body = await feature_values(rec, [user_id], [])
    return dict(body["users"][0])
