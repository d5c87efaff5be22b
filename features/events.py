"""Event vocabulary and the constants of the state-update math.

These constants are mirrored by the Lua scripts in ``recsvc/lua``; the store
passes them to the scripts as arguments, so this module stays the one source.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class EventType(IntEnum):
    """Behaviour event kinds, in funnel order (the value is the counter row)."""

    VIEW = 0
    CLICK = 1
    ADD_TO_CART = 2
    PURCHASE = 3


EVENT_NAMES: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase")
EVENT_BY_NAME: dict[str, EventType] = {name: EventType(i) for i, name in enumerate(EVENT_NAMES)}

# Half-lives of the decayed counters: short-term intent, today, this week.
HALF_LIVES: tuple[float, ...] = (3600.0, 86400.0, 7 * 86400.0)
HALF_LIFE_NAMES: tuple[str, ...] = ("1h", "1d", "7d")
N_TYPES = len(EVENT_NAMES)
N_HALF_LIVES = len(HALF_LIVES)
N_COUNTERS = N_TYPES * N_HALF_LIVES

# Category affinity decays over a few days: tastes drift slower than intent.
CATEGORY_HALF_LIFE = 3 * 86400.0
# A purchase says more about taste than a view; weights used for affinity.
CATEGORY_WEIGHTS: tuple[float, ...] = (1.0, 2.0, 4.0, 6.0)
# Newest items remembered per user (by event time).
RECENT_MAX = 20


def counter_index(event_type: int, half_life_index: int) -> int:
    """Position of (type, half-life) in the flat counter vector."""
    return event_type * N_HALF_LIVES + half_life_index


@dataclass(frozen=True, slots=True)
class Event:
    """One behaviour event as the state update sees it."""

    ts: float
    user_id: str
    item_id: str
    type: EventType
    event_id: str = ""
