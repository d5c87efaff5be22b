"""Event logs and catalogues in memory and on disk (the synthetic CSV layout).

``events.csv``: ``ts,user_id,item_id,type`` (ts in seconds, type a name from
``EVENT_NAMES``), sorted by time. ``items.csv``: ``item_id,category,price``.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.events import EVENT_BY_NAME, EVENT_NAMES


class LogFormatError(ValueError):
    """A file is not an event log or catalogue of the expected layout."""


@dataclass(frozen=True, slots=True)
class Catalogue:
    """Items with category and price (price 0 = unknown)."""

    item_ids: list[str]
    categories: list[str]
    prices: np.ndarray

    def __len__(self) -> int:
        return len(self.item_ids)


@dataclass(frozen=True, slots=True)
class EventLog:
    """Time-ordered events as parallel arrays over id vocabularies."""

    ts: np.ndarray
    user: np.ndarray
    item: np.ndarray
    type: np.ndarray
    user_ids: list[str]
    item_ids: list[str]

    def __len__(self) -> int:
        return len(self.ts)

    def rows(self) -> Iterator[tuple[float, str, str, int]]:
        """(ts, user_id, item_id, type) per event, in order."""
        users, items = self.user_ids, self.item_ids
        for ts, u, i, t in zip(
            self.ts.tolist(),
            self.user.tolist(),
            self.item.tolist(),
            self.type.tolist(),
            strict=True,
        ):
            yield ts, users[u], items[i], t


def write_catalogue(path: Path, catalogue: Catalogue) -> None:
    with path.open("w", newline="") as f:
        f.write("item_id,category,price\n")
        for item, cat, price in zip(
            catalogue.item_ids, catalogue.categories, catalogue.prices.tolist(), strict=True
        ):
            f.write(f"{item},{cat},{price:.2f}\n")


def read_catalogue(path: Path) -> Catalogue:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["item_id", "category", "price"]:
            raise LogFormatError(f"{path}: expected header item_id,category,price, got {header}")
        ids, cats, prices = [], [], []
        for n, row in enumerate(reader, start=2):
            if len(row) != 3:
                raise LogFormatError(f"{path}:{n}: expected 3 fields, got {len(row)}")
            ids.append(row[0])
            cats.append(row[1])
            prices.append(float(row[2] or 0.0))
    return Catalogue(ids, cats, np.asarray(prices))


def write_events(path: Path, log: EventLog) -> None:
    with path.open("w", newline="") as f:
        f.write("ts,user_id,item_id,type\n")
        f.writelines(f"{ts:.3f},{u},{i},{EVENT_NAMES[t]}\n" for ts, u, i, t in log.rows())


def read_events(path: Path) -> EventLog:
    """Read an events.csv written by ``write_events`` (sorted by time on load)."""
    users: dict[str, int] = {}
    items: dict[str, int] = {}
    ts: list[float] = []
    u_col: list[int] = []
    i_col: list[int] = []
    t_col: list[int] = []
    with path.open(newline="") as f:
        header = f.readline().strip()
        if header != "ts,user_id,item_id,type":
            raise LogFormatError(f"{path}: expected header ts,user_id,item_id,type, got {header!r}")
        for n, line in enumerate(f, start=2):
            parts = line.rstrip("\n").split(",")
            if len(parts) != 4 or parts[3] not in EVENT_BY_NAME:
                raise LogFormatError(f"{path}:{n}: not an event row: {line.strip()!r}")
            ts.append(float(parts[0]))
            u_col.append(users.setdefault(parts[1], len(users)))
            i_col.append(items.setdefault(parts[2], len(items)))
            t_col.append(EVENT_BY_NAME[parts[3]])
    ts_arr = np.asarray(ts, dtype=np.float64)
    order = np.argsort(ts_arr, kind="stable")
    return EventLog(
        ts=ts_arr[order],
        user=np.asarray(u_col, dtype=np.int32)[order],
        item=np.asarray(i_col, dtype=np.int32)[order],
        type=np.asarray(t_col, dtype=np.int8)[order],
        user_ids=list(users),
        item_ids=list(items),
    )
