"""The block reader gives what the line reader gives: the same log and the same
report, to the examples, on messy files of both layouts; Parquet logs too."""

from __future__ import annotations

import codecs
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features import logscan
from features.logs import (
    MAX_EXAMPLES,
    RECSVC_EVENTS_HEADER,
    RETAILROCKET_EVENTS_HEADER,
    EventLog,
    LogFormatError,
    ReadReport,
    _read_log_lines,
    read_log,
)

RECSVC = RECSVC_EVENTS_HEADER.encode() + b"\n"
RR = RETAILROCKET_EVENTS_HEADER.encode() + b"\n"
BOM = codecs.BOM_UTF8

# Field values the vectorised checks must leave to the line reader's rules: some
# are good there (float() takes "1e9", " 12", "1_000", Arabic-Indic digits).
ODD_TIMES = [
    "", "abc", "0", "0.000", "-5", "inf", "nan", "1e9", " 1700000000", "1700000000 ",
    "1_700_000_000", "١٧٠٠٠٠٠٠٠٠", "+1700000000", "1700000000.", ".1700000000", "1.2.3",
    "9" * 400, "1" + "0" * 40, "0x10", "\ufeff1700000000", "1700000000\x00", "1e-400",
    "4.9e-324", "1700000000..5", "17000.00000.1",
]  # fmt: skip
ODD_TIME_BYTES = [b"\xff1700", b"1700\xe2\x82"]
ODD_IDS = [
    "", "a b", "x" * 128, "x" * 129, "ü", "u-1:x@y.z_", '"u1"', "u1\x00", "\ufeffu1", "u\t",
    "ǅ", "u1\x0c", "\x85",
]  # fmt: skip
ODD_ID_BYTES = [b"\xffu", b"u\xc3", b"\xed\xa0\x80"]
ODD_EVENTS = ["View", " view", "view ", "wishlist", "", '"view"', "a" * 30, "ünknown-ü" * 4]
ODD_EVENT_BYTES = [b"\xe2\x82", b"view\xff"]
# Lines with another field count, blank or not.
ODD_LINES = [
    b"not,a,row", b"1,2,3,4,5,6", b",,,,,,", b"", b"   ", b"\t", "\xa0".encode(),
    "\u3000\t".encode(), b"\x0c", b"\x1c", b'"a,b",c', b"\xff\xfe", BOM, BOM + b"x,y",
]  # fmt: skip


def line_of(layout: bytes, ts: bytes, user: bytes, item: bytes, event: bytes) -> bytes:
    if layout == RECSVC:
        return b",".join((ts, user, item, event))
    return b",".join((ts, user, event, item, b"7" if event == b"transaction" else b""))


def messy(layout: bytes, rows: int, seed: int, bad: float = 0.2) -> bytes:
    """A log of ``rows`` lines with a share ``bad`` of odd ones, odd line ends too."""
    rng = np.random.default_rng(seed)
    names = (
        [b"view", b"click", b"add_to_cart", b"purchase"]
        if layout == RECSVC
        else [b"view", b"addtocart", b"transaction"]
    )
    odd = {
        "ts": [t.encode() for t in ODD_TIMES] + ODD_TIME_BYTES,
        "user": [u.encode() for u in ODD_IDS] + ODD_ID_BYTES,
        "item": [u.encode() for u in ODD_IDS] + ODD_ID_BYTES,
        "event": [e.encode() for e in ODD_EVENTS] + ODD_EVENT_BYTES,
    }
    out = [layout]
    for _ in range(rows):
        t = 1_700_000_000 + int(rng.integers(0, 10**6))
        fields = {
            "ts": f"{t}.{int(rng.integers(1000)):03d}".encode()
            if layout == RECSVC
            else str(t * 1000 + int(rng.integers(1000))).encode(),
            "user": f"u{int(rng.integers(60))}".encode(),
            "item": f"i{int(rng.integers(90))}".encode(),
            "event": names[int(rng.integers(len(names)))],
        }
        roll = rng.random()
        if roll < bad * 0.75:
            key = ("ts", "user", "item", "event")[int(rng.integers(4))]
            fields[key] = odd[key][int(rng.integers(len(odd[key])))]
        line = line_of(layout, fields["ts"], fields["user"], fields["item"], fields["event"])
        if bad * 0.75 <= roll < bad:
            line = ODD_LINES[int(rng.integers(len(ODD_LINES)))]
        end = (b"\n", b"\n", b"\n", b"\n", b"\r\n", b"\r")[int(rng.integers(6))]
        out.append(line + end)
    return b"".join(out)


def read_both(path: Path, block_bytes: int) -> tuple[tuple[EventLog, ReadReport], ...] | None:
    """Both readers' results, or None when both refuse the file with the same words."""
    try:
        want = _read_log_lines(path)
    except LogFormatError as e:
        refused = str(e)
    else:
        return logscan.read_csv_log(path, None, block_bytes), want
    with pytest.raises(LogFormatError) as got:
        logscan.read_csv_log(path, None, block_bytes)
    assert str(got.value) == refused
    return None


def assert_same_log(got: EventLog, want: EventLog) -> None:
    for name in ("ts", "user", "item", "type"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype, name
        assert np.array_equal(a, b), name
    assert got.user_ids == want.user_ids
    assert got.item_ids == want.item_ids


def assert_same(path: Path, block_bytes: int = logscan.BLOCK_BYTES) -> ReadReport | None:
    both = read_both(path, block_bytes)
    if both is None:
        return None
    (log, report), (want_log, want_report) = both
    assert_same_log(log, want_log)
    assert report == want_report
    assert list(report.skipped.items()) == list(want_report.skipped.items())
    return report


@pytest.mark.parametrize("layout", [RECSVC, RR], ids=["recsvc", "retailrocket"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block_bytes", [97, 4096, logscan.BLOCK_BYTES])
def test_the_block_reader_reads_messy_logs_as_the_line_reader_does(
    tmp_path: Path, layout: bytes, seed: int, block_bytes: int
) -> None:
    path = tmp_path / "events.csv"
    path.write_bytes(messy(layout, 2000, seed))
    report = assert_same(path, block_bytes)
    assert report is not None and report.kept > 1000
    assert len(report.examples) == MAX_EXAMPLES and len(report.skipped) > 10


@pytest.mark.parametrize("layout", [RECSVC, RR], ids=["recsvc", "retailrocket"])
def test_bad_rows_spread_thinly_over_many_blocks(tmp_path: Path, layout: bytes) -> None:
    """A few bad rows, each in its own block, far apart: the examples still carry
    their line numbers."""
    path = tmp_path / "events.csv"
    path.write_bytes(messy(layout, 5000, 3, bad=0.002))
    report = assert_same(path, 2048)
    assert report is not None and 0 < sum(report.skipped.values()) <= 40


def test_read_log_is_the_block_reader(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_bytes(messy(RR, 500, 4))
    log, report = read_log(path)
    want_log, want_report = _read_log_lines(path)
    assert_same_log(log, want_log)
    assert report == want_report


GOOD = b"1700000000.5,u1,i1,view\n"
EDGE_CASES = {
    "empty": b"",
    "only blank lines": b"\n \n\r\n",
    "header only": RECSVC,
    "header without line end": RECSVC.rstrip(),
    "foreign header": b"user,item,when\n1,2,3\n",
    "binary": b"\x89PNG\r\n\x1a\n\x00\x00binary",
    "BOM and CRLF header": BOM + RECSVC.replace(b"\n", b"\r\n") + GOOD.replace(b"\n", b"\r\n"),
    "blank lines before the header": b"\n\n  \n\r" + RECSVC + GOOD,
    "spaces around the header": b"  " + RECSVC.rstrip() + b" \t\n" + GOOD,
    "BOM after blank lines": b"\n" + BOM + RECSVC + GOOD,
    "no final line end": RECSVC + GOOD + b"1700000001,u2,i2,click",
    "lone CR line ends": RECSVC.replace(b"\n", b"\r") + GOOD.replace(b"\n", b"\r") * 3,
    "CR CR LF": RECSVC + b"1700000000,u1,i1,view\r\r\n1700000001,u2,i1,view\r\r\n",
    "BOM starts the first data line": RECSVC + BOM + GOOD + GOOD,
    "BOM starts a later data line": RECSVC + GOOD + BOM + GOOD + GOOD,
    "only bad rows": RECSVC + b"x,u1,i1,view\n1700000000,u 1,i1,view\n",
    "NUL bytes": RECSVC + b"1700000000,u\x001,i1,view\n\x00\n" + GOOD,
    "quotes are text": RECSVC + b'"1700000000",u1,i1,view\n1700000000,"u1",i1,view\n' + GOOD,
    "quoted comma": RECSVC + b'1700000000,"u,1",i1,view\n' + GOOD,
    "whitespace-only lines": RECSVC + b" \n\t\n\xc2\xa0\n\xe3\x80\x80\n\x0c\n" + GOOD,
    "a long good line": RECSVC + b"1700000000,u1,i1,view" + b" " * (3 << 20) + b"\n" + GOOD,
    "a long bad line": RECSVC + b"x" * (3 << 20) + b"\n" + GOOD,
    "a long id": RECSVC + b"1700000000,u1," + b"i" * (3 << 20) + b",view\n" + GOOD,
    "unsorted with ties": RECSVC + b"3,u1,i1,view\n1,u2,i2,view\n3,u3,i3,click\n1,u1,i3,view\n",
    "seen ids in bad rows": RECSVC + b"1,u1,i1,view\n2,u1,i1,nope\n3,u2,i1,view\n",
    "invalid UTF-8 in a kept row's last field": RR + b"1700000000000,1,view,2,\xff\xfe\n",
    "times as float() takes them": RECSVC
    + "1e9,u1,i1,view\n 12 ,u1,i1,view\n1_000,u1,i1,view\n١٢٣,u1,i1,view\n5.,u1,i1,view\n".encode()
    + b".5,u1,i1,view\n+7,u1,i1,view\n0.0000000000000000000000001,u1,i1,view\n",
}


# Every case at every block size, but the long lines a byte at a time (slow,
# and no more proof than 4096-byte blocks).
_EDGE_RUNS = [
    (name, block)
    for name in EDGE_CASES
    for block in (1, 16, 4096, logscan.BLOCK_BYTES)
    if len(EDGE_CASES[name]) <= 100_000 or block >= 4096
]


@pytest.mark.parametrize(("name", "block_bytes"), _EDGE_RUNS)
def test_edge_cases_read_as_the_line_reader_reads_them(
    tmp_path: Path, name: str, block_bytes: int
) -> None:
    content = EDGE_CASES[name]
    path = tmp_path / "events.csv"
    path.write_bytes(content)
    assert_same(path, block_bytes)


def test_progress_counts_the_rows_of_each_block(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_bytes(messy(RECSVC, 1000, 6))
    calls: list[int] = []
    _, report = logscan.read_csv_log(path, calls.append, 4096)
    assert len(calls) > 5 and sum(calls) == report.rows


def write_parquet(path: Path, header: str, rows: list[list[object]], **kw: object) -> None:
    names = header.split(",")
    pq.write_table(pa.table({n: [r[k] for r in rows] for k, n in enumerate(names)}), path, **kw)


def split_lines(content: bytes) -> list[list[bytes]]:
    return [line.split(b",") for line in content.split(b"\n")[1:] if line]


@pytest.mark.parametrize("batch_rows", [50, logscan.PARQUET_BATCH_ROWS])
def test_a_parquet_log_reads_as_its_csv_text(tmp_path: Path, batch_rows: int) -> None:
    """The same fields as bytes in Parquet and as lines of a CSV file: the same log
    and report, examples numbered by row."""
    content = messy(RECSVC, 1500, 7).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    rows = [r for r in split_lines(content) if len(r) == 4]
    csv, parquet = tmp_path / "events.csv", tmp_path / "events.parquet"
    csv.write_bytes(RECSVC + b"".join(b",".join(r) + b"\n" for r in rows))
    write_parquet(parquet, RECSVC_EVENTS_HEADER, rows, row_group_size=300)
    calls: list[int] = []
    log, report = logscan.read_parquet_log(parquet, calls.append, batch_rows)
    want_log, want = _read_log_lines(csv)
    assert_same_log(log, want_log)
    assert (report.layout, report.rows, report.skipped) == (want.layout, want.rows, want.skipped)
    # CSV line n + 1 is Parquet row n (the header is line 1).
    assert report.examples == [
        "row " + str(int(e.split(":")[0].split()[1]) - 1) + e[e.index(":") :] for e in want.examples
    ]
    assert sum(calls) == report.rows and (len(calls) > 1) == (batch_rows == 50)


def test_a_parquet_log_with_typed_columns(tmp_path: Path) -> None:
    """RetailRocket as numbers and a dictionary-coded event: read as their text;
    a missing value is an empty field."""
    csv, parquet = tmp_path / "events.csv", tmp_path / "events.parquet"
    rows = [
        [1433221332117, 257597, "view", 355908, None],
        [1433224214164, 992329, "transaction", 248676, 7.0],
        [None, 1, "view", 2, None],
        [1433221332118, None, "addtocart", 2, None],
        [1433221332119, -5, "wishlist", 2, None],
        [1433221332116, 257597, "view", 248676, None],
    ]
    table = pa.table(
        {
            "timestamp": pa.array([r[0] for r in rows], pa.int64()),
            "visitorid": pa.array([r[1] for r in rows], pa.int64()),
            "event": pa.array([r[2] for r in rows], pa.string()).dictionary_encode(),
            "itemid": pa.array([r[3] for r in rows], pa.int32()),
            "transactionid": pa.array([r[4] for r in rows], pa.float64()),
        }
    )
    pq.write_table(table, parquet)
    text = [",".join("" if v is None else str(v) for v in r[:4]) + "," for r in rows]
    csv.write_text(RETAILROCKET_EVENTS_HEADER + "\n" + "\n".join(text) + "\n")
    log, report = read_log(parquet)
    want_log, want = _read_log_lines(csv)
    assert_same_log(log, want_log)
    assert (
        report.skipped
        == want.skipped
        == {"bad_timestamp": 1, "bad_id": 1, "unknown_event:wishlist": 1}
    )
    assert report.examples[0] == "row 3: bad_timestamp: ',1,view,2'"
    assert log.user_ids == ["257597", "992329"] and len(log) == 3


def test_a_parquet_log_of_float_seconds(tmp_path: Path) -> None:
    path = tmp_path / "events.PARQUET"
    ts = [1700000000.125, 1700000001.1, float("nan"), 0.0, 1.5e9]
    table = pa.table(
        {
            "type": ["view", "click", "view", "view", "purchase"],
            "item_id": ["i1", "i2", "i1", "i1", "i3"],
            "user_id": ["u1", "u2", "u1", "u1", "u1"],
            "ts": ts,
        }
    )
    pq.write_table(table, path)
    log, report = read_log(path)
    assert report.skipped == {"bad_timestamp": 2}
    assert log.ts.tolist() == [1.5e9, 1700000000.125, 1700000001.1]
    assert log.item_ids == ["i1", "i2", "i3"]


def test_a_parquet_file_that_is_not_a_log_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    pq.write_table(pa.table({"user": ["u1"], "item": ["i1"]}), path)
    with pytest.raises(LogFormatError, match="not an event log: the header is 'user,item'"):
        read_log(path)
    path.write_bytes(b"ts,user_id,item_id,type\n1,u1,i1,view\n")
    with pytest.raises(LogFormatError, match="not a Parquet file"):
        read_log(path)
    pq.write_table(
        pa.table({"ts": ["x"], "user_id": ["u1"], "item_id": ["i1"], "type": ["view"]}), path
    )
    with pytest.raises(LogFormatError, match="no usable events"):
        read_log(path)
