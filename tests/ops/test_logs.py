"""Reading event logs and catalogues: both layouts, bad rows counted, not-a-log refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from features.events import EventType
from features.logs import LogFormatError, read_catalogue_report, read_log, write_events
from features.synthetic import SyntheticData
from tests.helpers import BAD_RR_ROWS, write_retailrocket


def test_retailrocket_layout_with_bad_rows(small_data: SyntheticData, tmp_path: Path) -> None:
    events, items = tmp_path / "events.csv", tmp_path / "items.csv"
    good = write_retailrocket(events, items, small_data, limit=3000)
    log, report = read_log(events)
    assert report.layout == "retailrocket"
    assert report.rows == good + len(BAD_RR_ROWS)
    assert len(log) == report.kept == good
    assert report.skipped == {
        "field_count": 1,
        "unknown_event:wishlist": 1,
        "bad_timestamp": 1,
        "bad_id": 2,
    }
    assert len(report.examples) == 5 and report.examples[0].startswith("line ")
    assert "3000 used, 5 skipped" in report.summary()
    assert np.all(np.diff(log.ts) >= 0)  # sorted, though the file is newest first
    first = small_data.events.ts[0]
    assert log.ts[0] == pytest.approx(int(first * 1000) / 1000)  # milliseconds -> seconds
    assert set(np.unique(log.type).tolist()) <= {
        EventType.VIEW,
        EventType.ADD_TO_CART,
        EventType.PURCHASE,
    }
    catalogue, items_report = read_catalogue_report(items)
    assert items_report.layout == "retailrocket" and items_report.skipped == {"bad_id": 1}
    assert len(catalogue) == len(small_data.catalogue)


def test_recsvc_layout_round_trips(small_data: SyntheticData, tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    write_events(path, small_data.events)
    log, report = read_log(path)
    assert report.layout == "recsvc" and report.skipped == {}
    assert len(log) == len(small_data.events)
    np.testing.assert_allclose(log.ts, np.round(small_data.events.ts, 3))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not an event log"),
        (b"user,item,when\n1,2,3\n", "not an event log: the header is 'user,item,when'"),
        (b"\x89PNG\r\n\x1a\n\x00\x00binary", "not an event log"),
        (
            b"timestamp,visitorid,event,itemid,transactionid\nx,y\n",
            "no usable events",
        ),
    ],
)
def test_a_file_that_is_not_a_log_fails_clearly(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "file.csv"
    path.write_bytes(content)
    with pytest.raises(LogFormatError, match=message):
        read_log(path)


def test_an_items_file_with_a_foreign_header_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "items.csv"
    path.write_text("timestamp,itemid,property,value\n1,2,categoryid,3\n")
    with pytest.raises(LogFormatError, match="not an items file"):
        read_catalogue_report(path)
