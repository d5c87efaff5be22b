"""Online feature reads (no HTTP here): named feature values of one user, as served."""

from __future__ import annotations

import math
import time
from typing import Any

from features.schema import user_features
from features.state import UserState
from recsvc.itemcache import ItemCache
from recsvc.store import FeatureStore


def _json_number(v: float) -> float | None:
    """NaN (a missing feature) becomes JSON null."""
    return None if math.isnan(v) else v


async def user_feature_values(
    store: FeatureStore, items: ItemCache, user_id: str
) -> dict[str, Any]:
    """``known``, state age and the user features at this instant (one Redis round trip)."""
    user = await store.fetch_user(user_id)
    now = time.time()
    values = user_features(user or UserState(), items.view.table, now)
    return {
        "user_id": user_id,
        "known": user is not None,
        "state_age_secs": now - user.last_ts if user is not None else None,
        "features": {k: _json_number(v) for k, v in values.items()},
    }
