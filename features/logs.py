"""Event logs and catalogues in memory and on disk.

Two event-log layouts are read, told apart by their header:

- recsvc (what ``recsvc generate`` writes): ``ts,user_id,item_id,type``, ts in
  seconds, type a name from ``EVENT_NAMES``;
- RetailRocket ``events.csv``: ``timestamp,visitorid,event,itemid,transactionid``,
  timestamp in milliseconds, event ``view``, ``addtocart`` or ``transaction``.

Catalogues: ``item_id,category,price`` (recsvc) or ``itemid,categoryid[,price]``.
Rows that cannot be used (wrong field count, bad number, an id the API would
refuse, an unknown event name) are skipped and counted in a ReadReport, never
fatal; a file that is not such a log at all raises LogFormatError.

An event log may also be a ``.parquet`` file with either layout's column names.
``read_log`` reads logs in blocks (``features.logscan``); ``_read_log_lines`` is
the line-by-line reader it must agree with, row for row.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from features.events import EVENT_BY_NAME, EVENT_NAMES, ID_REGEX, MAX_ID_LENGTH, EventType

RECSVC_EVENTS_HEADER = "ts,user_id,item_id,type"
RETAILROCKET_EVENTS_HEADER = "timestamp,visitorid,event,itemid,transactionid"
RETAILROCKET_EVENTS: dict[str, EventType] = {
    "view": EventType.VIEW,
    "addtocart": EventType.ADD_TO_CART,
    "transaction": EventType.PURCHASE,
}
PARQUET_SUFFIX = ".parquet"
CATALOGUE_HEADERS = ("item_id,category,price", "itemid,categoryid", "itemid,categoryid,price")
MAX_EXAMPLES = 5
_ID = re.compile(ID_REGEX)


def valid_id(value: str) -> bool:
    return len(value) <= MAX_ID_LENGTH and _ID.match(value) is not None


@dataclass(frozen=True, slots=True)
class EventLayout:
    """Where an event-log layout keeps each field, and its units and event names."""

    name: str
    columns: tuple[str, ...]
    ts: int
    user: int
    item: int
    type: int
    # Units of the timestamp per second.
    scale: float
    events: dict[str, EventType]

    @property
    def width(self) -> int:
        return len(self.columns)


EVENT_LAYOUTS = {
    RECSVC_EVENTS_HEADER: EventLayout(
        name="recsvc",
        columns=tuple(RECSVC_EVENTS_HEADER.split(",")),
        ts=0,
        user=1,
        item=2,
        type=3,
        scale=1.0,
        events=dict(EVENT_BY_NAME),
    ),
    RETAILROCKET_EVENTS_HEADER: EventLayout(
        name="retailrocket",
        columns=tuple(RETAILROCKET_EVENTS_HEADER.split(",")),
        ts=0,
        user=1,
        item=3,
        type=2,
        scale=1000.0,
        events=dict(RETAILROCKET_EVENTS),
    ),
}


def event_layout(path: Path, header: str) -> EventLayout:
    """The layout an event log's header names; LogFormatError if it names none."""
    layout = EVENT_LAYOUTS.get(header)
    if layout is None:
        raise LogFormatError(
            f"{path}: not an event log: the header is {header[:80]!r}; expected "
            f"{RECSVC_EVENTS_HEADER!r} (recsvc) or {RETAILROCKET_EVENTS_HEADER!r} (RetailRocket)"
        )
    return layout


@dataclass(slots=True)
class ReadReport:
    """What reading a file found: rows, what was skipped and why, a few examples."""

    path: str
    layout: str
    rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    # What an example's number counts: lines of a CSV file, rows of a Parquet file.
    unit: str = "line"

    @property
    def kept(self) -> int:
        return self.rows - sum(self.skipped.values())

    @property
    def wants_examples(self) -> bool:
        return len(self.examples) < MAX_EXAMPLES

    def count(self, reason: str) -> None:
        """One more row skipped for ``reason``: ``skip`` without an example (for a
        reader that stops counting lines once the examples are all taken)."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def skip(self, line_no: int, reason: str, line: str) -> None:
        self.count(reason)
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{self.unit} {line_no}: {reason}: {line[:80]!r}")

    def summary(self) -> str:
        text = f"{self.path}: {self.layout} layout, {self.rows} rows, {self.kept} used"
        if self.skipped:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
            text += f", {sum(self.skipped.values())} skipped ({reasons})"
        return text


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


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of the non-blank lines; undecodable bytes become U+FFFD,
    so a broken row is skipped as a bad row rather than failing the file."""
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        for n, line in enumerate(f, start=1):
            text = line.rstrip("\r\n")
            if text.strip():
                yield n, text


def _rows(
    lines: Iterator[tuple[int, str]], width: int, report: ReadReport
) -> Iterator[tuple[int, str, list[str]]]:
    """Data rows split into fields; rows with another field count are skipped."""
    for n, line in lines:
        report.rows += 1
        parts = line.split(",")
        if len(parts) != width:
            report.skip(n, "field_count", line)
            continue
        yield n, line, parts


def read_catalogue_report(path: Path) -> tuple[Catalogue, ReadReport]:
    """A catalogue in either layout; the last row of an item wins."""
    lines = _lines(path)
    first = next(lines, (1, ""))[1].strip().lstrip("\ufeff")
    if first not in CATALOGUE_HEADERS:
        raise LogFormatError(
            f"{path}: not an items file: the header is {first[:80]!r}; expected one of "
            + ", ".join(repr(h) for h in CATALOGUE_HEADERS)
        )
    width = first.count(",") + 1
    report = ReadReport(str(path), "recsvc" if first.startswith("item_id") else "retailrocket")
    items: dict[str, tuple[str, float]] = {}
    for n, line, parts in _rows(lines, width, report):
        item, category = parts[0], parts[1]
        if not valid_id(item):
            report.skip(n, "bad_id", line)
            continue
        if len(category) > MAX_ID_LENGTH:
            report.skip(n, "bad_category", line)
            continue
        price = 0.0
        if width == 3 and parts[2]:
            try:
                price = float(parts[2])
            except ValueError:
                price = -1.0
            if not (math.isfinite(price) and price >= 0):
                report.skip(n, "bad_price", line)
                continue
        items[item] = (category, price)
    return (
        Catalogue(
            list(items),
            [c for c, _ in items.values()],
            np.asarray([p for _, p in items.values()], dtype=np.float64),
        ),
        report,
    )


def read_catalogue(path: Path) -> Catalogue:
    return read_catalogue_report(path)[0]


def write_events(path: Path, log: EventLog) -> None:
    with path.open("w", newline="") as f:
        f.write("ts,user_id,item_id,type\n")
        f.writelines(f"{ts:.3f},{u},{i},{EVENT_NAMES[t]}\n" for ts, u, i, t in log.rows())


def read_log(
    path: Path, progress: Callable[[int], None] | None = None
) -> tuple[EventLog, ReadReport]:
    """An event log in either layout, CSV or Parquet, sorted by time, and what was
    skipped. ``progress`` is called with the number of rows read, block by block."""
    # Imported here, not above: pyarrow is needed only to read a log, and every
    # CLI command (the server too) imports this module for its types.
    from features import logscan

    if path.suffix.lower() == PARQUET_SUFFIX:
        return logscan.read_parquet_log(path, progress)
    return logscan.read_csv_log(path, progress)


def _read_log_lines(path: Path) -> tuple[EventLog, ReadReport]:
    """``read_log`` for CSV, one line at a time in Python: the reference the block
    reader is tested against (and the rules it applies to the rows it doubts)."""
    lines = _lines(path)
    layout = event_layout(path, next(lines, (1, ""))[1].strip().lstrip("\ufeff"))
    report = ReadReport(str(path), layout.name)
    ts_col, user_col, type_col, item_col = layout.ts, layout.user, layout.type, layout.item
    width, scale, names = layout.width, layout.scale, layout.events
    users: dict[str, int] = {}
    items: dict[str, int] = {}
    ts: list[float] = []
    u_col: list[int] = []
    i_col: list[int] = []
    t_col: list[int] = []
    for n, line, parts in _rows(lines, width, report):
        kind = names.get(parts[type_col])
        if kind is None:
            report.skip(n, f"unknown_event:{parts[type_col][:20]}", line)
            continue
        try:
            t = float(parts[ts_col]) / scale
        except ValueError:
            t = math.nan
        if not (math.isfinite(t) and t > 0):
            report.skip(n, "bad_timestamp", line)
            continue
        user, item = parts[user_col], parts[item_col]
        u, i = users.get(user), items.get(item)
        if (u is None and not valid_id(user)) or (i is None and not valid_id(item)):
            report.skip(n, "bad_id", line)
            continue
        if u is None:
            u = users[user] = len(users)
        if i is None:
            i = items[item] = len(items)
        ts.append(t)
        u_col.append(u)
        i_col.append(i)
        t_col.append(kind)
    if not ts:
        raise LogFormatError(f"no usable events in {report.summary()}")
    ts_arr = np.asarray(ts, dtype=np.float64)
    order = np.argsort(ts_arr, kind="stable")
    log = EventLog(
        ts=ts_arr[order],
        user=np.asarray(u_col, dtype=np.int32)[order],
        item=np.asarray(i_col, dtype=np.int32)[order],
        type=np.asarray(t_col, dtype=np.int8)[order],
        user_ids=list(users),
        item_ids=list(items),
    )
    return log, report


def read_events(path: Path) -> EventLog:
    """An event log in either layout (see ``read_log`` for what was skipped)."""
    return read_log(path)[0]
