"""Logged impressions: the JSONL files as the export writes them, and graded labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from features.events import EventType
from features.impressions import (
    Impression,
    ImpressionLog,
    ImpressionWriter,
    Outcome,
    impression_record,
    label,
    outcome_record,
    read_impressions,
)
from features.logs import LogFormatError

V, C, A, P = EventType.VIEW, EventType.CLICK, EventType.ADD_TO_CART, EventType.PURCHASE


def _log(*outcomes: Outcome) -> ImpressionLog:
    shown = Impression("r1", "u1", 100.0, ("a", "b", "c"))
    return ImpressionLog([shown], list(outcomes))


def test_labels_take_the_best_grade_of_the_same_users_outcomes_in_the_window() -> None:
    labels = label(
        _log(
            Outcome("r1", "u1", "a", V, 110.0),
            Outcome("r1", "u1", "a", P, 120.0),
            Outcome("r1", "u1", "a", C, 130.0),
            Outcome("r1", "u1", "b", A, 1899.0),
            Outcome("r1", "u2", "c", P, 110.0),  # another user: ignored
            Outcome("r1", "u1", "c", C, 1901.0),  # 1801 s after: outside the window
            Outcome("r1", "u1", "c", C, 99.0),  # before it was shown
            Outcome("r1", "u1", "z", C, 110.0),  # not shown
            Outcome("r9", "u1", "a", C, 110.0),  # no such impression
        ),
        window=1800.0,
    )
    assert labels.grades == {"r1": {"a": 4, "b": 3}}
    s = labels.stats
    assert (s.outcomes, s.used, s.user_mismatch, s.outside_window) == (9, 4, 1, 2)
    assert (s.not_shown, s.no_impression, s.after_split) == (1, 1, 0)
    assert label(_log(Outcome("r1", "u1", "b", A, 1899.0)), window=60.0).grades == {}


def test_a_training_impressions_label_never_reads_time_after_the_split() -> None:
    log = _log(Outcome("r1", "u1", "a", V, 110.0), Outcome("r1", "u1", "a", P, 120.0))
    labels = label(log, split_ts=115.0)
    assert labels.grades == {"r1": {"a": 1}} and labels.stats.after_split == 1
    # A held-out impression (at or after the split) keeps all its outcomes.
    assert label(log, split_ts=100.0).grades == {"r1": {"a": 4}}


def test_an_event_is_an_outcome_when_user_item_and_type_match_within_a_second() -> None:
    labels = label(_log(Outcome("r1", "u1", "a", C, 110.0), Outcome("r1", "u2", "b", C, 110.0)))
    assert labels.is_outcome("u1", "a", C, 110.0)
    assert labels.is_outcome("u1", "a", C, 110.9)
    assert not labels.is_outcome("u1", "a", C, 111.5)
    assert not labels.is_outcome("u1", "a", V, 110.0)
    assert not labels.is_outcome("u2", "b", C, 110.0)  # not the impression's user


def test_reading_takes_complete_files_only_and_counts_bad_lines(tmp_path: Path) -> None:
    with ImpressionWriter(tmp_path, "b") as out:
        out.impression(impression_record("r2", "u1", 200.0, ["x", "y"], model="m", version="v2"))
        out.impression(impression_record("r1", "u1", 100.0, ["a", "b"], strategy="fallback"))
        out.outcome(outcome_record("r1", "u1", "a", C, 101.0))
        assert not (tmp_path / "impressions-b.jsonl").exists()  # still being written
    with (tmp_path / "impressions-a.jsonl").open("w") as f:
        f.write("not json\n")
        f.write(json.dumps({"request_id": "r3", "user_id": "u1", "ts": "soon", "items": []}) + "\n")
        f.write("\n[1, 2]\n")
    (tmp_path / "impressions-c.jsonl").write_text(
        json.dumps(impression_record("r2", "u9", 1.0, ["q"])) + "\n"  # r2 again
    )
    (tmp_path / "impressions-d.jsonl.open").write_text(
        json.dumps(impression_record("r4", "u1", 300.0, ["a"])) + "\n"
    )
    log = read_impressions(tmp_path)
    assert [i.request_id for i in log.impressions] == ["r1", "r2"]  # time order
    first, second = log.impressions
    assert (first.strategy, first.items, first.version) == ("fallback", ("a", "b"), None)
    assert (second.user_id, second.model, second.version) == ("u1", "m", "v2")
    assert log.outcomes == [Outcome("r1", "u1", "a", C, 101.0)]
    bad = log.reports[0]
    assert bad.path.endswith("impressions-a.jsonl")
    assert bad.skipped == {"bad_json": 1, "bad_field": 1, "not_an_object": 1}
    # Files are read in name order: the second r2 is the duplicate.
    assert log.reports[2].skipped == {"duplicate_request_id": 1}
    assert [r.layout for r in log.reports] == ["impressions"] * 3 + ["outcomes"]


def test_a_directory_without_complete_impressions_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_impressions(tmp_path / "missing")
    (tmp_path / "impressions-1.jsonl.open").write_text("")
    with pytest.raises(LogFormatError, match="no complete impressions"):
        read_impressions(tmp_path)
