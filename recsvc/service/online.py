"""Online feature reads (no HTTP here): named feature values, as the ranker sees them."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import orjson

from features.candidates import ids_to_index
from features.schema import FEATURE_NAMES, build_matrix, user_features
from features.state import ItemTable, UserState
from recsvc.errors import InvalidRequest, Overloaded
from recsvc.ops import metrics
from recsvc.service.itemcache import ItemView
from recsvc.service.recommend import Recommender

T = TypeVar("T")

# POST /v1/features answers per process at a time (built and sent): a build
# holds the interpreter lock in its thread, so two at once starve the event
# loop, and an answer is megabytes held until the client has read it. Others
# wait up to FEATURES_WAIT_SECS (then 503 overloaded); the client gets
# FEATURES_SEND_SECS to read the answer (then the connection is closed).
FEATURES_WAIT_SECS = 2.0
FEATURES_SEND_SECS = 10.0


class FeaturesGate:
    """One features answer at a time per process (see FEATURES_WAIT_SECS)."""

    def __init__(
        self, wait_secs: float = FEATURES_WAIT_SECS, send_secs: float = FEATURES_SEND_SECS
    ) -> None:
        self._lock = asyncio.Lock()
        self.wait_secs = wait_secs
        self.send_secs = send_secs

    async def acquire(self) -> None:
        try:
            async with asyncio.timeout(self.wait_secs):
                await self._lock.acquire()
        except TimeoutError:
            metrics.shed("features")
            raise Overloaded("features") from None

    def release(self) -> None:
        self._lock.release()


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
        # NaN (missing) stays NaN here: orjson writes it as null, and a plain
        # dict(zip(...)) per row costs half of mapping each value.
        entry["items"] = [
            {"item_id": table.ids[i], "features": dict(zip(FEATURE_NAMES, row, strict=True))}
            for i, row in zip(idx.tolist(), rows, strict=True)
        ]
    return entry


# A batch read of many users is not a recommendation: it gets the request-path
# Redis deadline per this many users (a user state is up to ~2 KB with 100
# recent items), up to the write deadline.
USERS_PER_READ_DEADLINE = 10


def check_cells(user_ids: list[str], item_ids: list[str], max_cells: int) -> None:
    """InvalidRequest (naming ``item_ids``) past ``max_cells`` user x item rows:
    their cost grows with the product, which the per-list limits do not bound."""
    cells = len(user_ids) * len(item_ids)
    if cells > max_cells:
        raise InvalidRequest(
            f"{len(user_ids)} user_ids x {len(item_ids)} item_ids is {cells} rows; "
            f"at most {max_cells} per request",
            field="item_ids",
        )


async def _entries(
    rec: Recommender,
    user_ids: list[str],
    item_ids: list[str],
    finish: Callable[[dict[str, Any]], T],
) -> tuple[list[T], list[str]]:
    """Each user's entry, passed through ``finish``, and the unknown item ids.

    One Redis round trip; the entries (candidate sources and a feature matrix
    per user, the recent items) are built in a worker thread, so a batch does
    not hold up recommendations on the event loop.
    """
    store = rec.store
    batches = -(-len(user_ids) // USERS_PER_READ_DEADLINE)
    read_secs = min(store.timeout * max(batches, 1), store.write_timeout)
    users = await store.fetch_users(user_ids, read_secs=read_secs)
    now = time.time()
    view = rec.items.view

    def build() -> list[T]:
        out = []
        for u, s in zip(user_ids, users, strict=True):
            out.append(finish(_user_entry(rec, u, s, view, item_ids, now)))
            # This thread holds the interpreter lock while it builds; hand it
            # to the event loop between users (at most ~100 rows, a few ms),
            # not only when the 5 ms switch interval forces it.
            time.sleep(0)
        return out

    unknown = [i for i in dict.fromkeys(item_ids) if i not in view.table.index]
    return await asyncio.to_thread(build), unknown


async def feature_values(
    rec: Recommender, user_ids: list[str], item_ids: list[str]
) -> dict[str, Any]:
    """Features of users (and user x item rows) at this instant."""
    entries, unknown = await _entries(rec, user_ids, item_ids, lambda entry: entry)
    return {"users": entries, "unknown_items": unknown}


async def feature_values_json(
    rec: Recommender, user_ids: list[str], item_ids: list[str], max_cells: int
) -> list[bytes]:
    """``feature_values`` as JSON in pieces that concatenate to the answer (one
    per user), at most ``max_cells`` user x item rows (``check_cells``).

    Each user's entry is encoded in the worker thread as it is built, and the
    pieces are never joined here: the answer runs to megabytes, and one encoder
    call or one copy over all of it holds the interpreter lock (and so the
    event loop) for tens of milliseconds.
    """
    check_cells(user_ids, item_ids, max_cells)
    parts, unknown = await _entries(rec, user_ids, item_ids, orjson.dumps)
    out = [b'{"users":[']
    for k, part in enumerate(parts):
        out.append(b"," + part if k else part)
    out.append(b'],"unknown_items":' + orjson.dumps(unknown) + b"}")
    return out


async def user_feature_values(rec: Recommender, user_id: str) -> dict[str, Any]:
    """One user's features (GET /v1/users/{id}/features)."""
    body = await feature_values(rec, [user_id], [])
    return dict(body["users"][0])
