"""The storage format, defined once: how user and item state are laid out in Redis.

The Lua scripts hold no layout of their own: ``item_layout()`` and
``user_layout()`` are the first arguments of every call (offsets, widths and
the update constants), and this module decodes what the scripts store. The
row layout itself is ``features.state`` (``COL_*``; the offline replay uses
the same rows), the counters and constants are ``features.events``.
``docs/storage.md`` says what to change to add a field; the parity tests run
over every field declared here (``ITEM_FIELDS``, ``USER_FIELDS``).

Item state is sharded (``features.state.N_SHARDS``): shard ``s`` keeps its
rows, ids and version under the hash tag ``SHARD_TAGS[s]``, chosen so the
tags spread evenly over the 16,384 cluster slots (a cluster that splits the
slots into equal ranges gives each master an equal share of shards).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from features.events import (
    CATEGORY_HALF_LIFE,
    CATEGORY_WEIGHTS,
    COVISIT_BUCKET_ITEMS,
    COVISIT_BUCKET_SECS,
    COVISIT_HALF_LIFE,
    COVISIT_KEEP_SECS,
    COVISIT_NEIGHBOURS,
    HALF_LIVES,
    N_COUNTERS,
    N_TYPES,
    PURCHASED_MAX,
    RECENT_MAX,
)
from features.state import (
    COL_CATEGORY,
    COL_COUNTS,
    COL_FIRST_SEEN,
    COL_NBR,
    COL_NBR_REF,
    COL_NBR_SCORE,
    COL_PRICE,
    COL_REF,
    ITEM_WIDTH,
    N_SHARDS,
    UserState,
)

# Version of the Redis layout. 1: before co-visitation; 2: packed user state,
# item rows with neighbours; 3: a fourth half-life (30 days); 4: item state in
# N_SHARDS shards (rows at features.state.item_row).
STORAGE_FORMAT = 4


@dataclass(frozen=True, slots=True)
class Field:
    """A named run of float64 columns in a packed row."""

    name: str
    start: int
    width: int = 1


# The item row (features.state COL_*), one little-endian float64 per column.
ITEM_FIELDS: tuple[Field, ...] = (
    Field("ref", COL_REF),
    Field("first_seen", COL_FIRST_SEEN),
    Field("price", COL_PRICE),
    Field("category", COL_CATEGORY),
    Field("counts", COL_COUNTS, N_COUNTERS),
    Field("neighbour_ref", COL_NBR_REF),
    Field("neighbours", COL_NBR, COVISIT_NEIGHBOURS),
    Field("neighbour_counts", COL_NBR_SCORE, COVISIT_NEIGHBOURS),
)
ITEM_ROW_BYTES = ITEM_WIDTH * 8

# The user state hash: field 'x' packs these float64 scalars, then the
# counters; 'an' the category names (uint32 length + UTF-8 each), 'av' their
# affinities (float64, same order). Recent items, purchases and co-visit
# buckets are three zsets beside it (see recsvc.store.keys).
USER_SCALARS: tuple[str, ...] = (
    "n_events",
    "ref",
    "last_ts",
    "last_purchase_ts",
    "price_sum",
    "price_n",
)
USER_FIELDS: tuple[Field, ...] = (
    *(Field(name, k) for k, name in enumerate(USER_SCALARS)),
    Field("counts", len(USER_SCALARS), N_COUNTERS),
)
_USER_PACKED = struct.Struct(f"<{len(USER_SCALARS) + N_COUNTERS}d")
_NAME_LENGTH = struct.Struct("<I")


def item_layout() -> list[float | int]:
    """The item scripts' leading arguments (1-based Lua column numbers):
    width, ref, first seen, price, category, first counter, event types,
    neighbour ref, first neighbour, first neighbour count, neighbours,
    neighbour half-life, then the number of half-lives and each half-life."""
    return [
        ITEM_WIDTH,
        COL_REF + 1,
        COL_FIRST_SEEN + 1,
        COL_PRICE + 1,
        COL_CATEGORY + 1,
        COL_COUNTS + 1,
        N_TYPES,
        COL_NBR_REF + 1,
        COL_NBR + 1,
        COL_NBR_SCORE + 1,
        COVISIT_NEIGHBOURS,
        COVISIT_HALF_LIFE,
        len(HALF_LIVES),
        *HALF_LIVES,
    ]


ITEM_LAYOUT_ARGS = len(item_layout())


def user_layout() -> list[float | int]:
    """The user script's leading arguments: scalars before the counters, event
    types, recent items kept, purchases kept, category half-life, co-visit
    bucket seconds, items per bucket, seconds of buckets kept, the number of
    half-lives, each half-life, then one category weight per event type."""
    return [
        len(USER_SCALARS),
        N_TYPES,
        RECENT_MAX,
        PURCHASED_MAX,
        CATEGORY_HALF_LIFE,
        COVISIT_BUCKET_SECS,
        COVISIT_BUCKET_ITEMS,
        COVISIT_KEEP_SECS,
        len(HALF_LIVES),
        *HALF_LIVES,
        *CATEGORY_WEIGHTS,
    ]


# A user-side dedupe value: the event's type (one byte) and time (float64),
# then its item and co-visit partners, one per line (lua/user_event.lua
# writes it with the partners; the store rewrites it without them once the
# item side has them).
_DEDUPE_HEAD = struct.Struct("<Bd")


def dedupe_record(event_type: int, ts: float, item_id: str) -> bytes:
    """The dedupe value of an applied event whose pairs the item side has."""
    return _DEDUPE_HEAD.pack(event_type, ts) + item_id.encode()


def _names(blob: bytes) -> list[str]:
    out, pos = [], 0
    while pos < len(blob):
        (length,) = _NAME_LENGTH.unpack_from(blob, pos)
        pos += _NAME_LENGTH.size
        out.append(blob[pos : pos + length].decode())
        pos += length
    return out


def _pairs(reply: list[Any]) -> Any:
    """(member, score) pairs from a raw WITHSCORES reply: [[m, s], ...] in RESP3,
    [m, s, m, s, ...] in RESP2."""
    if reply and isinstance(reply[0], list):
        return reply
    return zip(reply[::2], reply[1::2], strict=True)


def decode_user(
    state: dict[bytes, bytes], recent: list[Any], purchased: list[bytes]
) -> UserState | None:
    """UserState from the three user keys (``recent`` as ZREVRANGE ... WITHSCORES
    sends it, ``purchased`` the members only); None when the user has no state."""
    packed = state.get(b"x")
    if not packed:
        return None
    n, ref, last, last_purchase, price_sum, price_n, *counts = _USER_PACKED.unpack(packed)
    names = _names(state.get(b"an", b""))
    values = struct.unpack(f"<{len(names)}d", state.get(b"av", b""))
    return UserState(
        ref=ref,
        counts=counts,
        category_affinity=dict(zip(names, values, strict=True)),
        recent={i.decode(): float(t) for i, t in _pairs(recent)},
        purchased={p.decode() for p in purchased},
        last_ts=last,
        last_purchase_ts=last_purchase,
        price_sum=price_sum,
        price_n=int(price_n),
        n_events=int(n),
    )


def _shard_tags(n: int) -> tuple[str, ...]:
    """Hash tags for n shards, shard k's in the k-th of n equal slot ranges: the
    first ``{i<k>.<j>}`` (j = 0, 1, ...) whose slot falls in that range."""
    tags = []
    for k in range(n):
        lo = k * REDIS_CLUSTER_HASH_SLOTS // n
        hi = (k + 1) * REDIS_CLUSTER_HASH_SLOTS // n
        j = 0
        while not lo <= key_slot(f"i{k}.{j}".encode()) < hi:
            j += 1
        tags.append(f"{{i{k}.{j}}}")
    return tuple(tags)


SHARD_TAGS: tuple[str, ...] = _shard_tags(N_SHARDS)
