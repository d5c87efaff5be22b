"""Event logs read in blocks with pyarrow: CSV in blocks of whole lines, Parquet
in record batches.

Each block's fields are checked vectorised. A row those checks cannot vouch for
(a bad row, or an odd good one such as a time written ``1e9``) goes through the
line reader's own rules (``logfields.check``), so the log and the report, to the example
lines, are those of ``logs._read_log_lines``. The CSV file is cut into blocks here,
not by pyarrow's streaming reader, because a row with another field count stops
pyarrow (its handler for such rows fails on bytes that are not UTF-8) and the
examples need each bad row's line number.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from features.logfields import Fields, Sink, check, vouch
from features.logs import (
    EVENT_LAYOUTS,
    EventLayout,
    EventLog,
    LogFormatError,
    ReadReport,
    event_layout,
)

# Bytes read at a time: some 400k rows, enough that the per-block work of numpy
# and pyarrow is small beside the rows, little enough to bound memory.
BLOCK_BYTES = 16 << 20
# Rows per Parquet batch, about a CSV block's worth.
PARQUET_BATCH_ROWS = 1 << 18
# pyarrow's own parse block: its unit of work across threads.
ARROW_BLOCK_BYTES = 1 << 20

_EOL = re.compile(rb"\r\n?|\n")
_NOT_EOL = re.compile(rb"[^\r\n]")
_BOM = codecs.BOM_UTF8
_PARSE = pcsv.ParseOptions(quote_char=False)
# Parquet column types cast to binary as they are; others are cast to their text first.
_TEXT_TYPES = (
    pa.types.is_string,
    pa.types.is_large_string,
    pa.types.is_binary,
    pa.types.is_large_binary,
    pa.types.is_fixed_size_binary,
)


def read_csv_log(
    path: Path, progress: Callable[[int], None] | None, block_bytes: int = BLOCK_BYTES
) -> tuple[EventLog, ReadReport]:
    """A CSV event log, ``block_bytes`` (and the rest of a line) at a time."""
    with path.open("rb") as f:
        blocks = _blocks(f, block_bytes)
        header, line, rest = _header(blocks)
        layout = event_layout(path, header.strip().lstrip("\ufeff"))
        report = ReadReport(str(path), layout.name)
        sink = Sink()
        next_line: int | None = line + 1
        for block in chain((rest,), blocks):
            before = report.rows
            next_line = _csv_block(block, layout, report, sink, next_line)
            if progress is not None:
                progress(report.rows - before)
    return sink.log(report), report


def read_parquet_log(
    path: Path, progress: Callable[[int], None] | None, batch_rows: int = PARQUET_BATCH_ROWS
) -> tuple[EventLog, ReadReport]:
    """A Parquet event log: the columns of either layout, as text or numbers (a
    number is read as its text); a missing value is an empty field."""
    try:
        f = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise LogFormatError(f"{path}: not a Parquet file: {e}") from e
    with f:
        names = f.schema_arrow.names
        found = (x for x in EVENT_LAYOUTS.values() if set(x.columns) <= set(names))
        layout = next(found, None) or event_layout(path, ",".join(names))  # which raises
        report = ReadReport(str(path), layout.name, unit="row")
        sink = Sink()
        columns = _field_names(layout)
        for batch in f.iter_batches(batch_size=batch_rows, columns=columns):
            block = Fields(*(_as_binary(batch.column(name)) for name in columns))
            row0 = report.rows
            report.rows += len(block)
            ok, ts, kind = vouch(block, layout)
            doubted = np.flatnonzero(~ok)
            for j, row in zip(doubted.tolist(), block.rows(doubted), strict=True):
                outcome = check(*row, layout)
                if not isinstance(outcome, str):
                    ok[j], ts[j], kind[j] = True, outcome[0], outcome[1]
                elif report.wants_examples:
                    report.skip(row0 + j + 1, outcome, _text(row, layout))
                else:
                    report.count(outcome)
            sink.add(block, ok, ts, kind)
            if progress is not None:
                progress(len(block))
    return sink.log(report), report


def _text(row: tuple[str, str, str, str], layout: EventLayout) -> str:
    """A Parquet row as a line of its layout (without the columns not read)."""
    at = (layout.ts, layout.user, layout.item, layout.type)
    return ",".join(value for _, value in sorted(zip(at, row, strict=True)))


def _blocks(f: IO[bytes], size: int) -> Iterator[bytes]:
    """The file in blocks of whole lines: each but the last ends with ``\\n``, so
    no ``\\r\\n`` is cut in two."""
    while block := f.read(size):
        yield block + f.readline() if block[-1:] != b"\n" else block


def _header(blocks: Iterator[bytes]) -> tuple[str, int, bytes]:
    """The first line that is not blank, decoded as the line reader does, its
    line number, and the rest of its block; ``""`` if there is none."""
    line = 0
    for block in blocks:
        at = 0
        while at < len(block):
            m = _EOL.search(block, at)
            end, after = (m.start(), m.end()) if m else (len(block), len(block))
            line += 1
            text = block[at:end].decode("utf-8", "replace")
            if text.strip():
                return text, line, block[after:]
            at = after
    return "", 1, b""


def _line_count(block: bytes) -> int:
    """Lines in a block as the line reader splits them: ``\\n``, ``\\r\\n`` or a
    lone ``\\r`` ends one."""
    ends = block.count(b"\n")
    if b"\r" in block:
        ends += block.count(b"\r") - block.count(b"\r\n")
    return ends + (block[-1:] not in (b"", b"\n", b"\r"))


@dataclass(frozen=True, slots=True)
class _Lines:
    """A block's lines as the line reader splits them: ``block[start:end]`` is a
    line without its line end; ``commas`` counts its commas."""

    start: np.ndarray
    end: np.ndarray
    commas: np.ndarray

    @classmethod
    def of(cls, block: bytes) -> _Lines:
        b = np.frombuffer(block, dtype=np.uint8)
        ends = b == ord("\n")  # where a line end's last byte is
        if b"\r" in block:
            cr = np.flatnonzero(b == ord("\r"))
            ends[cr[(cr + 1 == len(b)) | ~ends[np.minimum(cr + 1, len(b) - 1)]]] = True
        last = np.flatnonzero(ends)
        end = last - ((b[last] == ord("\n")) & (last > 0) & (b[last - 1] == ord("\r")))
        start = np.concatenate(([0], last + 1))
        if start[-1] == len(b):
            start = start[:-1]
        else:
            end = np.append(end, len(b))
        commas = np.flatnonzero(b == ord(","))
        count = np.searchsorted(commas, end) - np.searchsorted(commas, start)
        return cls(start, end, count)

    def __len__(self) -> int:
        return len(self.start)

    def text(self, block: bytes, k: int) -> str:
        return block[self.start[k] : self.end[k]].decode("utf-8", "replace")

    def without(self, block: bytes, which: np.ndarray) -> bytes:
        """The block without the lines ``which`` (ascending) and their line ends."""
        after = np.append(self.start[1:], len(block))
        cuts = [0, *np.column_stack((self.start[which], after[which])).ravel().tolist(), len(block)]
        return b"".join(block[cuts[k] : cuts[k + 1]] for k in range(0, len(cuts), 2))


def _csv_block(
    block: bytes, layout: EventLayout, report: ReadReport, sink: Sink, line: int | None
) -> int | None:
    """Reads one block of whole lines. ``line``: the number of its first line while
    the report still wants examples, else None. Returns the next block's."""
    lines = None
    try:
        fields = _parse(block, layout, ARROW_BLOCK_BYTES)
        odd = np.zeros(0, dtype=np.int64)
    except pa.ArrowInvalid:
        # A line with another field count (or one longer than pyarrow's block):
        # parse the lines that fit; the others are the line reader's.
        lines = _Lines.of(block)
        misfits = np.flatnonzero(lines.commas != layout.width - 1)
        fields = _parse(lines.without(block, misfits), layout, None)
        odd = misfits[lines.end[misfits] > lines.start[misfits]]
    report.rows += len(fields)
    ok, ts, kind = vouch(fields, layout)
    doubted = np.flatnonzero(~ok)
    if len(doubted) and lines is None and line is not None and report.wants_examples:
        lines = _Lines.of(block)
    outcomes = fields.outcomes(doubted, layout)
    if lines is None:
        for j, outcome in zip(doubted.tolist(), outcomes, strict=True):
            if isinstance(outcome, str):
                report.count(outcome)
            else:
                ok[j], ts[j], kind[j] = True, outcome[0], outcome[1]
    else:
        # Rows in the line reader's order: the reasons' order in the report is its.
        row_line = np.flatnonzero(lines.commas == layout.width - 1)
        if len(row_line) != len(fields):
            raise AssertionError(f"{len(fields)} rows parsed from {len(row_line)} lines")
        doubted_line = row_line[doubted]
        for o in np.argsort(np.concatenate((doubted_line, odd)), kind="stable").tolist():
            if o >= len(doubted):
                k = int(odd[o - len(doubted)])
                text = lines.text(block, k)
                if text.strip():  # else a blank line, not a row
                    report.rows += 1
                    _skip(report, line, k, "field_count", text)
                continue
            outcome, j = outcomes[o], int(doubted[o])
            if isinstance(outcome, str):
                k = int(doubted_line[o])
                _skip(report, line, k, outcome, lines.text(block, k))
            else:
                ok[j], ts[j], kind[j] = True, outcome[0], outcome[1]
    sink.add(fields, ok, ts, kind)
    if line is None or not report.wants_examples:
        return None
    return line + (len(lines) if lines is not None else _line_count(block))


def _skip(report: ReadReport, line: int | None, k: int, reason: str, text: str) -> None:
    if line is None:
        report.count(reason)
    else:
        report.skip(line + k, reason, text)


def _parse(block: bytes, layout: EventLayout, arrow_block: int | None) -> Fields:
    """The fields of a block's rows, as bytes; ArrowInvalid if a line has another
    field count. ``arrow_block`` None: the block is pyarrow's one block, so a line
    of any length parses."""
    if _NOT_EOL.search(block) is None:
        return Fields.empty()
    if block.startswith(_BOM):
        # pyarrow drops a BOM at the start of what it reads; the line reader keeps
        # it (in the first field, which then fails), wherever the block starts.
        block = b"\n" + block
    names = _field_names(layout)
    table = pcsv.read_csv(
        pa.py_buffer(block),
        read_options=pcsv.ReadOptions(
            column_names=list(layout.columns), block_size=arrow_block or len(block) + 1
        ),
        parse_options=_PARSE,
        convert_options=pcsv.ConvertOptions(
            column_types=dict.fromkeys(names, pa.binary()), include_columns=names
        ),
    )
    return Fields(*(table.column(name).combine_chunks() for name in names))


def _field_names(layout: EventLayout) -> list[str]:
    """The columns read: time, user, item, event."""
    return [layout.columns[k] for k in (layout.ts, layout.user, layout.item, layout.type)]


def _as_binary(column: Any) -> Any:
    """A Parquet column as the text of each value, in bytes; a missing value is empty."""
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if not any(is_text(column.type) for is_text in _TEXT_TYPES):
        column = column.cast(pa.string())
    return column.cast(pa.binary()).fill_null(pa.scalar(b"", pa.binary()))
