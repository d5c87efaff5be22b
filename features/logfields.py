"""A block of event-log fields, checked vectorised, and the log its kept rows make.

``vouch`` passes the rows it can vouch for without Python per row; ``check`` is
the line reader's rule for one row (``logs._read_log_lines``), for the others.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.events import ID_REGEX, MAX_ID_LENGTH, EventType
from features.logs import EventLayout, EventLog, LogFormatError, ReadReport, valid_id

# Longest time text the vectorised parse takes; longer ones (never a real
# timestamp) go through float().
MAX_FAST_TS_BYTES = 32

# Bytes an id may hold: ID_REGEX is one character class repeated, so an id is
# valid when every byte is in it (no byte of a multi-byte character is) and its
# length, in bytes then, is within MAX_ID_LENGTH.
_ID_BYTES = np.array([re.match(ID_REGEX, chr(b)) is not None for b in range(256)])
_DIGITS = np.zeros(256, dtype=bool)
_DIGITS[ord("0") : ord("9") + 1] = True
_DECIMAL_BYTES = _DIGITS.copy()
_DECIMAL_BYTES[ord(".")] = True

# Why a row is skipped, or its time and event.
Outcome = str | tuple[float, EventType]


@dataclass(frozen=True, slots=True)
class Fields:
    """A block's fields as binary arrays without nulls, one element per row."""

    ts: Any
    user: Any
    item: Any
    kind: Any

    @classmethod
    def empty(cls) -> Fields:
        return cls(*(pa.array([], pa.binary()) for _ in range(4)))

    def __len__(self) -> int:
        return len(self.ts)

    def rows(self, which: np.ndarray) -> list[tuple[str, str, str, str]]:
        """(ts, user, item, event) of the rows ``which``, decoded as the line reader does."""
        if not len(which):
            return []
        take = pa.array(which)
        columns = [c.take(take).to_pylist() for c in (self.ts, self.user, self.item, self.kind)]
        return [
            (
                t.decode("utf-8", "replace"),
                u.decode("utf-8", "replace"),
                i.decode("utf-8", "replace"),
                e.decode("utf-8", "replace"),
            )
            for t, u, i, e in zip(*columns, strict=True)
        ]

    def outcomes(self, which: np.ndarray, layout: EventLayout) -> list[Outcome]:
        return [check(*row, layout) for row in self.rows(which)]


def check(ts: str, user: str, item: str, event: str, layout: EventLayout) -> Outcome:
    """The line reader's rules for one row: why it is skipped, or its time and event."""
    kind = layout.events.get(event)
    if kind is None:
        return f"unknown_event:{event[:20]}"
    try:
        t = float(ts) / layout.scale
    except ValueError:
        t = math.nan
    if not (math.isfinite(t) and t > 0):
        return "bad_timestamp"
    if not (valid_id(user) and valid_id(item)):
        return "bad_id"
    return t, kind


def vouch(fields: Fields, layout: EventLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ok, time, event) per row, vectorised; a row not ok may still be good: the
    line reader's rules decide it."""
    if not len(fields):
        return np.zeros(0, bool), np.zeros(0, np.float64), np.zeros(0, np.int8)
    names = list(layout.events)
    values = pa.array([name.encode() for name in names], pa.binary())
    codes = np.array([layout.events[name] for name in names], dtype=np.int8)
    found = pc.index_in(fields.kind, value_set=values)
    ok = found.is_valid().to_numpy(zero_copy_only=False)
    kind = codes[found.fill_null(0).to_numpy(zero_copy_only=False)]
    fast, ts = times(fields.ts, layout.scale)
    ok &= fast & ids_ok(fields.user) & ids_ok(fields.item)
    return ok, ts, kind


def _parts(a: Any) -> tuple[np.ndarray, np.ndarray]:
    """The bytes and offsets of a binary array: row r is data[offsets[r]:offsets[r + 1]]."""
    _, offsets, data = a.buffers()
    o = np.frombuffer(offsets, dtype=np.int32)[a.offset : a.offset + len(a) + 1]
    return (np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)), o


def _stray(a: Any, allowed: np.ndarray) -> np.ndarray:
    """Per row: holds a byte outside ``allowed``."""
    data, offsets = _parts(a)
    out = np.zeros(len(a), dtype=bool)
    stray = ~allowed[data[offsets[0] : offsets[-1]]]
    if stray.any():
        at = np.flatnonzero(stray) + offsets[0]
        out[np.searchsorted(offsets, at, side="right") - 1] = True
    return out


def ids_ok(a: Any) -> np.ndarray:
    """``valid_id`` per row."""
    lengths = np.diff(_parts(a)[1])
    ok: np.ndarray = (lengths >= 1) & (lengths <= MAX_ID_LENGTH) & ~_stray(a, _ID_BYTES)
    return ok


def times(a: Any, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(ok, seconds) per row: ok where the text is plain digits with at most one
    point inside and parses to a finite time after 0 (as float() would parse it:
    both round correctly); others are left to float()."""
    data, offsets = _parts(a)
    lengths = np.diff(offsets)
    ok = (lengths >= 1) & (lengths <= MAX_FAST_TS_BYTES) & ~_stray(a, _DECIMAL_BYTES)
    if len(data):
        last = len(data) - 1
        ok &= _DIGITS[data[np.minimum(offsets[:-1], last)]]
        ok &= _DIGITS[data[np.clip(offsets[1:] - 1, 0, last)]]
    else:
        ok[:] = False
    try:
        values = _to_float(a, ok)
    except pa.ArrowInvalid:  # a text with two points
        dots = np.flatnonzero(data[offsets[0] : offsets[-1]] == ord(".")) + offsets[0]
        row = np.searchsorted(offsets, dots, side="right") - 1
        ok &= np.bincount(row, minlength=len(a)) <= 1
        values = _to_float(a, ok)
    values = values / scale
    ok &= np.isfinite(values) & (values > 0)
    return ok, values


def _to_float(a: Any, ok: np.ndarray) -> np.ndarray:
    text = a if ok.all() else pc.if_else(pa.array(ok), a, pa.scalar(b"0", pa.binary()))
    return np.asarray(pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False), np.float64)


class Sink:
    """The kept rows of every block, ids coded in order of first appearance."""

    def __init__(self) -> None:
        self.users: dict[str, int] = {}
        self.items: dict[str, int] = {}
        # Per column (time, user, item, event), its blocks' arrays.
        self.columns: tuple[list[np.ndarray], ...] = ([], [], [], [])

    def add(self, fields: Fields, keep: np.ndarray, ts: np.ndarray, kind: np.ndarray) -> None:
        users, items = fields.user, fields.item
        if not keep.all():
            mask = pa.array(keep)
            users, items, ts, kind = users.filter(mask), items.filter(mask), ts[keep], kind[keep]
        coded = (ts, _codes(users, self.users), _codes(items, self.items), kind)
        for column, part in zip(self.columns, coded, strict=True):
            column.append(part)

    def log(self, report: ReadReport) -> EventLog:
        if not any(len(part) for part in self.columns[0]):
            raise LogFormatError(f"no usable events in {report.summary()}")
        ts, user, item, kind = (self._join(column) for column in self.columns)
        if np.any(ts[1:] < ts[:-1]):
            order = np.argsort(ts, kind="stable")
            ts, user, item, kind = ts[order], user[order], item[order], kind[order]
        return EventLog(ts, user, item, kind, list(self.users), list(self.items))

    @staticmethod
    def _join(parts: list[np.ndarray]) -> np.ndarray:
        """One column from its parts, which go as it is made: memory for one column more."""
        joined = np.concatenate(parts)
        parts.clear()
        return joined


def _codes(ids: Any, vocab: dict[str, int]) -> np.ndarray:
    """``ids`` as codes in ``vocab``, which takes the new ones in order of first appearance."""
    if not len(ids):
        return np.zeros(0, dtype=np.int32)
    coded = pc.dictionary_encode(ids)  # its dictionary is in order of first appearance
    names = coded.dictionary.cast(pa.string()).to_pylist()
    code = np.fromiter(map(vocab.get, names, repeat(-1)), dtype=np.int32, count=len(names))
    new = np.flatnonzero(code < 0)
    if len(new):
        codes = range(len(vocab), len(vocab) + len(new))
        code[new] = codes
        vocab.update(zip(map(names.__getitem__, new.tolist()), codes, strict=True))
    coded_rows: np.ndarray = code[coded.indices.to_numpy(zero_copy_only=False)]
    return coded_rows
