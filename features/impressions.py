"""Logged impressions and their outcomes: the JSONL files, and graded labels.

One directory holds complete files (``recsvc export-impressions`` and
``recsvc simulate --impressions-out`` write them; a file still being written
ends in ``.jsonl.open`` and is not read), one JSON object per line:

- ``impressions-*.jsonl``: an answered recommendation: ``request_id``,
  ``user_id``, ``ts`` (seconds), ``strategy``, ``fallback_reason``, ``model``,
  ``version``, ``arm``, ``rollout``, ``canary_share``, ``experiments``,
  ``weights``, ``forced``, ``items`` (ids in served order: ``items[i]`` was
  shown at position i + 1), ``sources``, ``latency_ms``, ``sample``;
- ``outcomes-*.jsonl``: an applied event that carried a recommendation's
  ``request_id``: ``request_id``, ``user_id``, ``item_id``, ``type``, ``ts``.

An impression's labels are its outcomes from the same user within a window
after it, graded as training grades events (purchase > add_to_cart > click >
view), the best per item; a shown item without one is 0.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from features.events import EVENT_BY_NAME, EVENT_NAMES
from features.logs import LogFormatError, ReadReport

# Relevance grade of an event by type (index: EventType); shown-and-ignored is 0.
GRADES: tuple[int, ...] = (1, 2, 3, 4)
# Outcomes count this long after their impression (a session's reach).
LABEL_WINDOW_SECS = 1800.0
# A sampled training event is "the same event" as an impression's outcome when
# user, item and type agree and the times are this close (the export and the
# event log may round times differently).
SAME_EVENT_SECS = 1.0
IMPRESSIONS_GLOB = "impressions-*.jsonl"
OUTCOMES_GLOB = "outcomes-*.jsonl"
OPEN_SUFFIX = ".open"


@dataclass(frozen=True, slots=True)
class Impression:
    """What one answer showed: the fields training and evaluation read."""

    request_id: str
    user_id: str
    ts: float
    items: tuple[str, ...]
    strategy: str = "model"
    model: str | None = None
    version: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    request_id: str
    user_id: str
    item_id: str
    type: int
    ts: float


@dataclass(slots=True)
class ImpressionLog:
    """Impressions in time order and every outcome read, with what reading skipped."""

    impressions: list[Impression]
    outcomes: list[Outcome]
    reports: list[ReadReport] = field(default_factory=list)


@dataclass(slots=True)
class LabelStats:
    """What became of the outcomes when joined to their impressions."""

    outcomes: int = 0
    used: int = 0
    no_impression: int = 0
    user_mismatch: int = 0
    outside_window: int = 0
    not_shown: int = 0
    # Outcomes of a training impression at or after the split: held-out time.
    after_split: int = 0

    def summary(self) -> dict[str, int]:
        return {
            "outcomes": self.outcomes,
            "used_as_labels": self.used,
            "ignored_no_impression": self.no_impression,
            "ignored_user_mismatch": self.user_mismatch,
            "ignored_outside_window": self.outside_window,
            "ignored_not_shown": self.not_shown,
            "ignored_after_split": self.after_split,
        }


@dataclass(slots=True)
class Labels:
    """Grades per impression (request id -> item id -> grade > 0), and the times of
    the outcomes that belong to a logged impression, for the fill-in rule."""

    grades: dict[str, dict[str, int]]
    stats: LabelStats
    outcome_times: dict[tuple[str, str, int], list[float]]

    def is_outcome(self, user_id: str, item_id: str, event_type: int, ts: float) -> bool:
        """Whether an event of the log is an outcome of a logged impression."""
        times = self.outcome_times.get((user_id, item_id, event_type))
        if not times:
            return False
        k = bisect.bisect_left(times, ts - SAME_EVENT_SECS)
        return k < len(times) and times[k] <= ts + SAME_EVENT_SECS


def label(
    log: ImpressionLog, window: float = LABEL_WINDOW_SECS, split_ts: float = math.inf
) -> Labels:
    """Join outcomes to impressions by request id. An outcome counts when its user is
    the impression's, it falls in [ts, ts + window] of it and names a shown item;
    for an impression before ``split_ts`` it must also come before the split (a
    training label never reads held-out time)."""
    by_id = {imp.request_id: imp for imp in log.impressions}
    shown = {imp.request_id: set(imp.items) for imp in log.impressions}
    stats = LabelStats(outcomes=len(log.outcomes))
    grades: dict[str, dict[str, int]] = {}
    times: dict[tuple[str, str, int], list[float]] = {}
    for o in log.outcomes:
        imp = by_id.get(o.request_id)
        if imp is None:
            stats.no_impression += 1
            continue
        if o.user_id != imp.user_id:
            stats.user_mismatch += 1
            continue
        times.setdefault((o.user_id, o.item_id, o.type), []).append(o.ts)
        if not imp.ts <= o.ts <= imp.ts + window:
            stats.outside_window += 1
        elif o.item_id not in shown[o.request_id]:
            stats.not_shown += 1
        elif imp.ts < split_ts <= o.ts:
            stats.after_split += 1
        else:
            stats.used += 1
            item_grades = grades.setdefault(o.request_id, {})
            item_grades[o.item_id] = max(item_grades.get(o.item_id, 0), GRADES[o.type])
    for ts in times.values():
        ts.sort()
    return Labels(grades, stats, times)


def _files(directory: Path, pattern: str) -> list[Path]:
    return sorted(p for p in directory.glob(pattern) if p.is_file())


def _records(path: Path, report: ReadReport) -> Iterator[tuple[int, str, dict[str, Any]]]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            report.rows += 1
            try:
                doc = json.loads(text)
            except ValueError:
                report.skip(n, "bad_json", text)
                continue
            if not isinstance(doc, dict):
                report.skip(n, "not_an_object", text)
                continue
            yield n, text, doc


def _time(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    t = float(value)
    return t if math.isfinite(t) and t > 0 else None


def _impression(doc: dict[str, Any]) -> Impression | None:
    rid, user, ts, items = (
        doc.get("request_id"),
        doc.get("user_id"),
        doc.get("ts"),
        doc.get("items"),
    )
    t = _time(ts)
    if not (isinstance(rid, str) and rid and isinstance(user, str) and user and t is not None):
        return None
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        return None
    model, version, strategy = doc.get("model"), doc.get("version"), doc.get("strategy")
    return Impression(
        rid,
        user,
        t,
        tuple(items),
        strategy if isinstance(strategy, str) else "model",
        model if isinstance(model, str) else None,
        version if isinstance(version, str) else None,
    )


def _outcome(doc: dict[str, Any]) -> Outcome | None:
    rid, user, item, kind = (doc.get(k) for k in ("request_id", "user_id", "item_id", "type"))
    t = _time(doc.get("ts"))
    if not all(isinstance(v, str) and v for v in (rid, user, item)) or t is None:
        return None
    event_type = EVENT_BY_NAME.get(kind) if isinstance(kind, str) else None
    if event_type is None:
        return None
    return Outcome(str(rid), str(user), str(item), int(event_type), t)


def read_impressions(directory: Path) -> ImpressionLog:
    """Every complete impressions and outcomes file of ``directory``; bad lines are
    skipped and counted, a second impression with a request id already read too."""
    if not directory.is_dir():
        raise FileNotFoundError(f"no impressions directory {directory}")
    paths = _files(directory, IMPRESSIONS_GLOB)
    if not paths:
        raise LogFormatError(f"{directory}: no complete {IMPRESSIONS_GLOB} file")
    impressions: list[Impression] = []
    seen: set[str] = set()
    reports = []
    for path in paths:
        report = ReadReport(str(path), "impressions")
        for n, text, doc in _records(path, report):
            imp = _impression(doc)
            if imp is None:
                report.skip(n, "bad_field", text)
            elif imp.request_id in seen:
                report.skip(n, "duplicate_request_id", text)
            else:
                seen.add(imp.request_id)
                impressions.append(imp)
        reports.append(report)
    outcomes: list[Outcome] = []
    for path in _files(directory, OUTCOMES_GLOB):
        report = ReadReport(str(path), "outcomes")
        for n, text, doc in _records(path, report):
            o = _outcome(doc)
            if o is None:
                report.skip(n, "bad_field", text)
            else:
                outcomes.append(o)
        reports.append(report)
    impressions.sort(key=lambda imp: imp.ts)
    return ImpressionLog(impressions, outcomes, reports)


def impression_record(
    request_id: str,
    user_id: str,
    ts: float,
    items: list[str],
    sources: list[str] | None = None,
    strategy: str = "model",
    fallback_reason: str | None = None,
    model: str | None = None,
    version: str | None = None,
    experiments: dict[str, str] | None = None,
    forced: list[str] | None = None,
    latency_ms: float | None = None,
) -> dict[str, Any]:
    """One impressions line; the fields a writer cannot know are null."""
    return {
        "request_id": request_id,
        "user_id": user_id,
        "ts": ts,
        "strategy": strategy,
        "fallback_reason": fallback_reason,
        "model": model,
        "version": version,
        "arm": None,
        "rollout": None,
        "canary_share": None,
        "experiments": experiments or {},
        "weights": {},
        "forced": forced or [],
        "items": items,
        "sources": sources if sources is not None else [None] * len(items),
        "latency_ms": latency_ms,
        "sample": 1.0,
    }


def outcome_record(
    request_id: str, user_id: str, item_id: str, event_type: int, ts: float
) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "user_id": user_id,
        "item_id": item_id,
        "type": EVENT_NAMES[event_type],
        "ts": ts,
    }


class ImpressionWriter:
    """Writes ``impressions-<stamp>.jsonl`` and ``outcomes-<stamp>.jsonl`` under a
    directory, as ``.jsonl.open`` until ``close`` makes them complete (a reader
    never sees half a file)."""

    def __init__(self, directory: Path, stamp: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.paths = [directory / f"{kind}-{stamp}.jsonl" for kind in ("impressions", "outcomes")]
        self._files: list[IO[str]] = [
            (p.parent / (p.name + OPEN_SUFFIX)).open("w", encoding="utf-8") for p in self.paths
        ]
        self.impressions = 0
        self.outcomes = 0

    def impression(self, record: dict[str, Any]) -> None:
        self._files[0].write(json.dumps(record, separators=(",", ":")) + "\n")
        self.impressions += 1

    def outcome(self, record: dict[str, Any]) -> None:
        self._files[1].write(json.dumps(record, separators=(",", ":")) + "\n")
        self.outcomes += 1

    def close(self) -> None:
        for f, path in zip(self._files, self.paths, strict=True):
            if not f.closed:
                f.close()
                os.replace(f.name, path)

    def __enter__(self) -> ImpressionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
