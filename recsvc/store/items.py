"""Item state read from Redis shard by shard, and applied to an in-process table.

A serving process keeps one cursor per shard (its epoch, version and how many
of its items it holds). A refresh asks every shard, in one pipeline, for what
changed since: a shard with no change answers in a few bytes, a changed one
with its new ids and changed rows, or everything when too much changed or the
shard was rebuilt (another epoch). ``patch_table`` writes the answers into the
table in place, O(changed rows); ``place_full`` fills a new table from full reads
(``FeatureStore.load_items``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from features.state import ITEM_WIDTH, N_SHARDS, ItemTable, item_row

# A shard sends at most this many changed rows; beyond it, all of its rows
# (one GET is cheaper than many GETRANGEs).
DELTA_MAX_ROWS = 5_000


@dataclass(frozen=True, slots=True)
class ShardCursor:
    """What a reader holds of one shard."""

    epoch: str = ""
    version: int = -1
    known: int = 0  # ids (positions) held


@dataclass(frozen=True, slots=True)
class ShardRead:
    """One shard's answer: ids added after the reader's ``known``; the rows at
    ``positions`` (``None``: every row, from position 0)."""

    shard: int
    epoch: str
    version: int
    first: int  # position of new_ids[0]
    new_ids: list[str]
    positions: np.ndarray | None
    rows: np.ndarray
    # Rows the shard's row string holds: fewer than its ids only when the shard
    # is damaged (keys edited or evicted by hand); ids past it are not taken.
    held: int = -1
    ids: int = -1  # the shard's id count
    size: int = -1  # the row string's length in bytes

    @property
    def same(self) -> bool:
        return self.positions is not None and not len(self.positions) and not self.new_ids

    @property
    def damaged(self) -> bool:
        """More ids than rows, or a row string that is not whole rows."""
        if self.held < 0:
            return False
        return self.held < self.ids or self.size != self.held * ITEM_WIDTH * 8

    def cursor(self) -> ShardCursor:
        return ShardCursor(self.epoch, self.version, self.first + len(self.usable_ids))

    @property
    def usable_ids(self) -> list[str]:
        """The new ids that have rows."""
        if self.held < 0:
            return self.new_ids
        return self.new_ids[: max(0, self.held - self.first)]


@dataclass(frozen=True, slots=True)
class ItemsRead:
    """Every shard's answer and the categories added after the reader's count."""

    shards: list[ShardRead]
    new_categories: list[str]

    @property
    def epoch(self) -> str:
        """One token for all shards' epochs: changes when any shard was rebuilt."""
        joined = "|".join(s.epoch for s in self.shards).encode()
        return hashlib.blake2b(joined, digest_size=8).hexdigest()

    @property
    def version(self) -> int:
        """Grows with every change in any shard."""
        return sum(s.version for s in self.shards)

    def rebuilt(self, cursors: Sequence[ShardCursor]) -> bool:
        """Whether a shard the reader held answered from another epoch (its keys
        were rebuilt, items deleted, or another server answers: a failover or a
        restart, see lua/item_read.lua) or with an older version under the same
        epoch (data rolled back): the reader must start again from empty."""
        return any(
            c.epoch and (c.epoch != s.epoch or s.version < c.version)
            for c, s in zip(cursors, self.shards, strict=True)
        )


def decode_shard(shard: int, cursor: ShardCursor, reply: list[Any]) -> ShardRead:
    """``lua/item_read.lua``'s reply as a ShardRead."""
    epoch, version, ids, mode, positions, rows, held, total, size = reply
    epoch = epoch.decode()
    full = mode == b"full"
    first = cursor.known if epoch == cursor.epoch and cursor.epoch else 0
    # A read-only view of the reply (copied once, into the table).
    raw = np.frombuffer(rows or b"", dtype="<f8").reshape(-1, ITEM_WIDTH)
    return ShardRead(
        shard=shard,
        epoch=epoch,
        version=int(version),
        first=first,
        new_ids=[i.decode() for i in ids],
        positions=None if full else np.asarray([int(p) for p in positions], np.int64),
        rows=raw,
        held=int(held),
        ids=int(total),
        size=int(size),
    )


def rows_for(counts: Sequence[int]) -> int:
    """Rows a table needs for shards holding ``counts`` items each."""
    return max((item_row(s, c - 1) + 1 for s, c in enumerate(counts) if c), default=0)


def place_full(table: ItemTable, reads: Sequence[ShardRead]) -> None:
    """Full reads (every id from position 0, every row) into a table that holds
    none of these shards' items yet."""
    for s in reads:
        if s.first != 0 or s.positions is not None:
            raise ValueError(f"shard {s.shard}: not a full read")
        ids = s.usable_ids[: len(s.rows)]  # a damaged shard: only the items with rows
        if not ids:
            continue
        rows = np.arange(len(ids), dtype=np.int64) * N_SHARDS + s.shard
        values = s.rows[: len(ids)]
        table.reserve(int(rows[-1]) + 1)
        if "" in ids:  # a deleted item's place (lua/item_delete.lua): an empty row
            keep = np.asarray([bool(i) for i in ids])
            rows, values, ids = rows[keep], values[keep], [i for i in ids if i]
        table.place_many(rows, ids)
        table.raw[rows] = values
        # The shard's next item goes after its last place, deleted or not.
        table.shard_counts[s.shard] = max(int(table.shard_counts[s.shard]), len(s.usable_ids))


def patch_table(table: ItemTable, read: ItemsRead) -> np.ndarray:
    """Apply a refresh to ``table`` in place (rows reserved beforehand with
    ``rows_needed``); the rows whose values changed."""
    if read.new_categories:
        for c in read.new_categories:
            table.category_id(c)
    changed: list[np.ndarray] = [np.zeros(0, np.int64)]
    for s in read.shards:
        if s.same:
            continue
        if s.first != table_count(table, s.shard):
            raise ValueError(
                f"shard {s.shard}: read from position {s.first}, "
                f"the table holds {table_count(table, s.shard)}"
            )
        _place_ids(table, s)
        changed.append(_write_rows(table, s))
    return np.concatenate(changed)


def table_count(table: ItemTable, shard: int) -> int:
    return int(table.shard_counts[shard])


def rows_needed(table: ItemTable, read: ItemsRead) -> int:
    """Rows the table needs for ``read``'s new items."""
    n = table.n
    for s in read.shards:
        if s.usable_ids:
            n = max(n, item_row(s.shard, s.first + len(s.usable_ids) - 1) + 1)
    return n


def _place_ids(table: ItemTable, s: ShardRead) -> None:
    ids = s.usable_ids
    positions = np.arange(s.first, s.first + len(ids), dtype=np.int64)
    table.place_many(positions * N_SHARDS + s.shard, ids)


def _write_rows(table: ItemTable, s: ShardRead) -> np.ndarray:
    positions = np.arange(len(s.rows)) if s.positions is None else s.positions
    if len(positions) != len(s.rows):
        raise ValueError(f"shard {s.shard}: {len(s.rows)} rows for {len(positions)} positions")
    # Only rows of items the table holds (a damaged shard has rows past its ids,
    # or ids past its rows).
    keep = positions < table_count(table, s.shard)
    positions, values = positions[keep], s.rows[keep]
    rows = np.asarray(positions, np.int64) * N_SHARDS + s.shard
    if len(rows) and int(rows.max()) >= table.n:
        raise ValueError(f"shard {s.shard}: a row past the {table.n} the table holds")
    table.raw[rows] = values
    return rows
