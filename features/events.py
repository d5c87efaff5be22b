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

# Half-lives of the decayed counters: short-term intent, today, this week, and
# this month (what lasts: where people watch or buy over months, the month's
# popularity predicts the next item far better than the day's).
HALF_LIVES: tuple[float, ...] = (3600.0, 86400.0, 7 * 86400.0, 30 * 86400.0)
HALF_LIFE_NAMES: tuple[str, ...] = ("1h", "1d", "7d", "30d")
N_TYPES = len(EVENT_NAMES)
N_HALF_LIVES = len(HALF_LIVES)
N_COUNTERS = N_TYPES * N_HALF_LIVES

# Category affinity decays over a few days: tastes drift slower than intent.
CATEGORY_HALF_LIFE = 3 * 86400.0
# A purchase says more about taste than a view; weights used for affinity.
CATEGORY_WEIGHTS: tuple[float, ...] = (1.0, 2.0, 4.0, 6.0)
# Newest items remembered per user (by event time): the recent and history
# sources, the seen-items ban, and the recent-position features read them.
RECENT_MAX = 100
# Newest purchases remembered per user (by purchase time), never recommended
# again. Read on every recommendation, so bounded (a reseller's or a bot's
# 300k purchases cost 47 ms of Redis per read); twice the candidate cap, and
# a purchase older than the user's newest 200 is mostly of an item no source
# proposes any more.
PURCHASED_MAX = 200

# Co-visitation: two items are co-visited when one user interacted with both in
# the same clock-hour bucket. Fixed buckets (rather than "within W seconds of each
# other in arrival order") make the pair set independent of arrival order: a pair
# is counted once, when the second of its two items reaches the bucket, whichever
# that is. A pair's weight is taken at the bucket's start time.
COVISIT_BUCKET_SECS = 3600.0
# Distinct items per user and bucket that form pairs (a bot's burst stops pairing).
COVISIT_BUCKET_ITEMS = 20
# Neighbours kept per item, and the half-life of their decayed pair counts.
COVISIT_NEIGHBOURS = 20
COVISIT_HALF_LIFE = 7 * 86400.0
# Buckets a user keeps (by event time before their newest event): at least the
# oldest event the service accepts (the dedupe window) must still find its bucket.
COVISIT_KEEP_SECS = 2 * 86400.0


# Clock skew tolerated from clients: an event may be this far in the future
# (it is applied at the time it arrives). Its dedupe keys must outlive the
# window in which a retry is still accepted, which the skew lengthens.
MAX_FUTURE_SECS = 300.0

# Ids of users, items and events: the API's rule, and the rule for logs we load
# (an id the API refuses could never be asked about). No way to shape a key.
# ID_PATTERN is the rule as a JSON Schema (ECMA-262) pattern, where '$' is the
# end of the string; ID_REGEX is the same rule for Python's re, whose '$' also
# matches before a final newline ("u1\n" would pass, and a newline in an id
# would split the lines of a dedupe record).
ID_PATTERN = r"^[A-Za-z0-9_.:@\-]+$"
ID_REGEX = r"^[A-Za-z0-9_.:@\-]+\Z"
MAX_ID_LENGTH = 128


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
