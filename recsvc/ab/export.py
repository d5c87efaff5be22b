"""`recsvc export-impressions`: the impression and outcome streams into rotating
JSON-lines files, without losing or repeating an entry.

Delivery is a consumer group (``recsvc-export``) on each stream plus a
checkpoint file in the output directory (``.export-state.json``). For each batch
read with XREADGROUP the lines are appended to the stream's open file
(``impressions-<UTC time>-<seq>.jsonl.open``) and fsynced; then the checkpoint
(per stream: the last stream id on disk, the open file and its length) is
written to a temporary file, fsynced and renamed over the old one; only then are
the entries acknowledged (XACK). After a crash anywhere in that sequence, the
next run cuts the open file back to its checkpointed length (dropping lines the
checkpoint does not cover) and reads the group's pending entries again
(XREADGROUP from 0): those at or before the checkpoint's id are already on disk
and are only acknowledged, the others are written. So every entry reaches disk
exactly once, deduplicated by stream id.

A file gets its ``.jsonl`` name (rename, then directory fsync) only once it is
complete: at ``rotate_bytes``, after ``rotate_secs``, and on exit. When the
directory holds more than ``max_bytes``, the oldest complete files are deleted,
each logged and counted.

Entries the stream's cap (``RECSVC_EXPOSURE_STREAM_MAX``) trimmed before they
were read are detected by comparing the stream's first entry with the group's
last delivered id, checked in one transaction with the read (so no trim falls
between them; on a cluster, in one pipeline): Redis 7 counts them
(``entries-added`` less the group's ``entries-read`` less what is still in the
stream); Redis 6 cannot, and the gap is reported as uncounted. Pending
entries whose data was trimmed before a restart could write them are counted
exactly.

``trim``: after acknowledging, XTRIM MINID up to the last exported id, so Redis
holds only what is not yet on disk (the last exported entry stays, the mark the
next run's gap check compares with), and never past the start of the step of a
running canary roll-out: its controller reads the step from the streams, and a
controller taking over rebuilds the step from there. Off by default (`recsvc
ab-report --from DIR` reads the files too); the cap bounds Redis memory either
way.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, ParamSpec, TypeVar

import orjson
from redis.asyncio import RedisCluster
from redis.exceptions import ResponseError

from recsvc.ab.impressions import FIELD
from recsvc.ab.rollout import RolloutStore
from recsvc.errors import StoreUnavailable
from recsvc.store import keys
from recsvc.store.client import REDIS_FAILURES, RedisClient

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

GROUP = "recsvc-export"
CONSUMER = "exporter"
STATE = ".export-state.json"
LOCK = ".export.lock"
# Entries per XREADGROUP: ~1 MB of impressions, one fsync and one checkpoint.
BATCH = 2000
# How long --follow waits when both streams are drained.
POLL_SECS = 0.5
STREAMS = {"impressions": keys.IMPRESSIONS, "outcomes": keys.OUTCOMES}
COMPLETE = re.compile(r"^(impressions|outcomes)-(\d{8}T\d{6}Z)-(\d+)\.jsonl$")
OUTCOME_FIELDS = ("request_id", "user_id", "item_id", "type")


class ExportError(RuntimeError):
    """The export cannot go on: another one holds the directory, its checkpoint
    cannot be read, or a file cannot be written."""


def parse_id(stream_id: bytes | str) -> tuple[int, int]:
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def trimmed_unread(info: dict[str, Any], group: dict[str, Any]) -> int | None:
    """Entries trimmed from a stream before ``group`` read them, from XINFO STREAM
    and the group's XINFO GROUPS entry: a count, or None when some may have been
    and Redis cannot count them (before Redis 7: no ``entries-added``)."""
    delivered = parse_id(group["last-delivered-id"])
    first = info.get("first-entry")
    if first is not None:
        if parse_id(first[0]) <= delivered:
            return 0  # trimming cuts from the front: everything after the mark is there
    elif parse_id(info.get("last-generated-id") or b"0-0") <= delivered:
        return 0  # empty, and nothing was added after the mark
    added, read = info.get("entries-added"), group.get("entries-read")
    if added is not None and read is not None:
        # Every entry still in the stream is after the mark (the first one is).
        return max(0, int(added) - int(read) - int(info["length"]))
    if delivered == (0, 0):
        return 0  # never read: a gap before the export began cannot be told from none
    return None


def _disk(method: Callable[P, R]) -> Callable[P, R]:
    """A file error is fatal, never taken for a Redis failure (OSError is one of
    those) and retried with the files and the checkpoint out of step: the next
    run repairs them from the checkpoint."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except OSError as exc:
            raise ExportError(f"cannot write the export: {exc}") from exc

    return wrapper


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class StreamState:
    """One stream's part of the checkpoint."""

    name: str
    last_id: str = "0-0"
    open: str | None = None
    size: int = 0
    opened: float = 0.0

    def persisted(self) -> dict[str, Any]:
        return {
            "last_id": self.last_id,
            "open": self.open,
            "size": self.size,
            "opened": self.opened,
        }


@dataclass
class Summary:
    written: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STREAMS, 0))
    files: int = 0
    bytes: int = 0
    deleted_files: int = 0
    deleted_bytes: int = 0
    # Counted (Redis 7, or pending entries whose data went); uncounted gaps (Redis 6).
    trimmed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STREAMS, 0))
    trimmed_uncounted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STREAMS, 0))
    skipped: int = 0

    def line(self) -> str:
        def trims(name: str) -> str:
            gaps = self.trimmed_uncounted[name]
            return f"{self.trimmed[name]}" + (f" + {gaps} uncounted gap(s)" if gaps else "")

        return (
            f"exported {self.written['impressions']} impressions and "
            f"{self.written['outcomes']} outcomes; {self.files} files completed, "
            f"{self.bytes} bytes written; {self.deleted_files} old files "
            f"({self.deleted_bytes} bytes) deleted over --max-mb; trimmed by the stream "
            f"cap before export: impressions {trims('impressions')}, outcomes "
            f"{trims('outcomes')}"
            + (f"; {self.skipped} malformed entries skipped" if self.skipped else "")
        )


class Exporter:
    def __init__(
        self,
        client: RedisClient,
        out: Path,
        rotate_bytes: int,
        max_bytes: int,
        rotate_secs: float = 600.0,
        trim: bool = False,
        batch: int = BATCH,
    ) -> None:
        self.client = client
        self.out = out
        self.rotate_bytes = rotate_bytes
        self.max_bytes = max_bytes
        self.rotate_secs = rotate_secs
        self.trim = trim
        self.batch = batch
        self.seq = 0
        self.streams = {name: StreamState(name) for name in STREAMS}
        self.summary = Summary()
        self._lock: IO[bytes] | None = None

    # -- the checkpoint and the files ---------------------------------------

    @_disk
    def _save(self) -> None:
        state = {"seq": self.seq, "streams": {n: s.persisted() for n, s in self.streams.items()}}
        tmp = self.out / (STATE + ".tmp")
        with tmp.open("wb") as f:
            f.write(orjson.dumps(state, option=orjson.OPT_INDENT_2))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.out / STATE)
        _fsync_dir(self.out)

    @_disk
    def _recover(self) -> None:
        """Load the checkpoint and make the files agree with it."""
        path = self.out / STATE
        if path.exists():
            try:
                state = orjson.loads(path.read_bytes())
                self.seq = int(state["seq"])
                for name, s in state["streams"].items():
                    if name in self.streams:
                        self.streams[name] = StreamState(
                            name, s["last_id"], s["open"], int(s["size"]), float(s["opened"])
                        )
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ExportError(f"{path}: not an export checkpoint ({exc})") from None
        named = {s.open for s in self.streams.values() if s.open}
        for stray in sorted(self.out.glob("*.jsonl.open")):
            if stray.name not in named:  # created, but the crash came before its checkpoint
                log.warning("removing %s: no checkpoint covers it (its entries are re-read)", stray)
                stray.unlink()
        for s in self.streams.values():
            if s.open is None:
                continue
            current = self.out / s.open
            if not current.exists():
                if not (self.out / s.open.removesuffix(".open")).exists():
                    log.error("%s is missing: %d exported bytes are gone", current, s.size)
                s.open, s.size = None, 0  # else renamed just before the crash: complete
                continue
            if current.stat().st_size != s.size:
                log.warning(
                    "cutting %s back to its checkpointed %d bytes (the rest is re-read)",
                    current,
                    s.size,
                )
                with current.open("r+b") as f:
                    f.truncate(s.size)
                    os.fsync(f.fileno())
        self._save()

    @_disk
    def _append(self, s: StreamState, data: bytes) -> None:
        if s.open is None:
            self.seq += 1
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            s.open, s.size, s.opened = f"{s.name}-{stamp}-{self.seq:06d}.jsonl.open", 0, time.time()
            (self.out / s.open).touch(exist_ok=False)
            _fsync_dir(self.out)
        try:
            with (self.out / s.open).open("ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            # Disk full, say: drop the part written, so a retry (--follow) appends
            # whole lines after the checkpointed ones, never after half of one.
            with contextlib.suppress(OSError), (self.out / s.open).open("r+b") as f:
                f.truncate(s.size)
                os.fsync(f.fileno())
            raise
        s.size += len(data)
        self.summary.bytes += len(data)

    @_disk
    def _complete(self, s: StreamState) -> None:
        """Give the open file its final name (its lines are fsynced and checkpointed)."""
        if s.open is None:
            return
        done = self.out / s.open.removesuffix(".open")
        (self.out / s.open).rename(done)
        _fsync_dir(self.out)
        s.open, s.size = None, 0
        self._save()
        self.summary.files += 1
        self._enforce_max()

    def _complete_files(self) -> Iterator[tuple[tuple[str, int], Path]]:
        for path in self.out.iterdir():
            m = COMPLETE.match(path.name)
            if m:
                yield (m.group(2), int(m.group(3))), path

    @_disk
    def _enforce_max(self) -> None:
        """Delete the oldest complete files while the directory holds more than max_bytes."""
        files = sorted(self._complete_files())
        total = sum(p.stat().st_size for _, p in files)
        total += sum(s.size for s in self.streams.values())
        for _, path in files:
            if total <= self.max_bytes:
                return
            size = path.stat().st_size
            path.unlink()
            total -= size
            self.summary.deleted_files += 1
            self.summary.deleted_bytes += size
            log.warning(
                "deleted %s (%d bytes): the export directory is over --max-mb", path.name, size
            )

    # -- Redis ----------------------------------------------------------------

    async def _groups(self) -> None:
        for name, key in STREAMS.items():
            try:
                await self.client.xgroup_create(
                    key, GROUP, id=self.streams[name].last_id, mkstream=True
                )
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _line(self, name: str, fields: dict[bytes, bytes]) -> bytes | None:
        if name == "impressions":
            raw = fields.get(FIELD.encode())
            return raw + b"\n" if raw else None
        try:
            row: dict[str, Any] = {k: fields[k.encode()].decode() for k in OUTCOME_FIELDS}
            row["ts"] = float(fields[b"ts"])
        except (KeyError, ValueError, UnicodeDecodeError):
            return None
        return orjson.dumps(row) + b"\n"

    async def _take(self, name: str, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Write what is not on disk yet and checkpoint it, then acknowledge."""
        if not entries:
            return
        self._write(name, entries)
        await self._ack(name, entries)
        s = self.streams[name]
        if s.size >= self.rotate_bytes:
            self._complete(s)

    def _write(self, name: str, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Append the lines of the entries after the checkpoint, fsync, checkpoint."""
        s = self.streams[name]
        mark = parse_id(s.last_id)
        lines: list[bytes] = []
        for entry_id, fields in entries:
            if parse_id(entry_id) <= mark:
                continue  # on disk before a crash or a restart
            if not fields:  # delivered, then trimmed before it could be written
                self.summary.trimmed[name] += 1
                continue
            line = self._line(name, fields)
            if line is None:
                self.summary.skipped += 1
                log.warning("skipping a malformed %s entry %s", name, entry_id.decode())
                continue
            lines.append(line)
        if lines:
            self._append(s, b"".join(lines))
            self.summary.written[name] += len(lines)
        last = max((e[0] for e in entries), key=parse_id)
        if parse_id(last) > mark:
            s.last_id = last.decode()
            self._save()

    async def _ack(self, name: str, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Only once the entries are on disk and checkpointed."""
        key = STREAMS[name]
        await self.client.xack(key, GROUP, *[e[0] for e in entries])
        if self.trim:  # MINID keeps the last exported entry: the next gap check's mark
            minid = self.streams[name].last_id
            floor = await self._rollout_floor()
            if floor is not None and parse_id(floor) < parse_id(minid):
                minid = floor
            await self.client.xtrim(key, minid=minid, approximate=False)

    async def _rollout_floor(self) -> str | None:
        """The first stream id a running canary step still reads (None: no step runs)."""
        records = await RolloutStore(self.client).all()
        starts = [r.step_started_at for r in records.values() if r.running]
        return f"{int(min(starts) * 1000)}-0" if starts else None

    async def _pending(self, name: str) -> None:
        """Entries delivered before a crash or a stop and never acknowledged."""
        start = "0"
        while True:
            got: Any = await self.client.xreadgroup(
                GROUP, CONSUMER, {STREAMS[name]: start}, count=self.batch
            )
            entries = got[0][1] if got else []
            if not entries:
                return
            await self._take(name, entries)
            start = entries[-1][0].decode()

    async def _step(self, name: str) -> bytes | None:
        """Read and write one batch of new entries; the last id read, or None."""
        key = STREAMS[name]
        # MULTI: no trim falls between the check and the read. redis-py's cluster
        # client cannot run a MULTI from asyncio (it runs it on a loop of its own
        # in a thread); its pipeline sends the three to the stream's node
        # together, which Redis runs back to back in practice.
        pipe = self.client.pipeline(transaction=not isinstance(self.client, RedisCluster))
        pipe.xinfo_stream(key)
        pipe.xinfo_groups(key)
        pipe.xreadgroup(GROUP, CONSUMER, {key: ">"}, count=self.batch)
        try:
            info, groups, got = await pipe.execute()
        except ResponseError as exc:
            if "NOGROUP" not in str(exc) and "no such key" not in str(exc):
                raise
            log.warning("the %s stream or its export group is gone; creating it again", name)
            await self._groups()
            return None
        group = next(g for g in groups if g["name"] == GROUP.encode())
        entries = got[0][1] if got else []
        gap = trimmed_unread(info, group)
        if gap is None or gap > 0:
            if gap is None:
                self.summary.trimmed_uncounted[name] += 1
            else:
                self.summary.trimmed[name] += gap
            log.warning(
                "the %s stream's cap trimmed %s entries before they were exported "
                "(after id %s); run the export more often or raise RECSVC_EXPOSURE_STREAM_MAX",
                name,
                "some (Redis < 7 cannot count them)" if gap is None else gap,
                group["last-delivered-id"].decode(),
            )
            if not entries and info.get("last-generated-id"):  # nothing left to move the mark
                await self.client.xgroup_setid(key, GROUP, info["last-generated-id"])
        await self._take(name, entries)
        return entries[-1][0] if entries else None

    # -- the run ----------------------------------------------------------------

    async def run(self, follow: bool, stop: asyncio.Event | None = None) -> Summary:
        """Drain both streams (to their ends at the start, or until ``stop`` when
        following), then complete the open files."""
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock = (self.out / LOCK).open("wb")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ExportError(f"another export is writing to {self.out}") from None
        try:
            self._recover()
            self._enforce_max()
            await self._groups()
            for name in STREAMS:
                await self._pending(name)
            ends: dict[str, tuple[int, int]] = {}
            if not follow:
                for name, key in STREAMS.items():
                    info = await self.client.xinfo_stream(key)
                    ends[name] = parse_id(info.get("last-generated-id") or b"0-0")
            live = set(STREAMS)
            stop = stop or asyncio.Event()
            failing: set[str] = set()  # streams whose last read failed
            while live and not stop.is_set():
                idle = True
                for name in sorted(live):
                    try:
                        if name in failing:  # read but not acknowledged before the failure
                            await self._pending(name)
                        last = await self._step(name)
                    except REDIS_FAILURES as exc:
                        if not follow:
                            raise StoreUnavailable(
                                f"Redis failed during the export: {exc!r}"
                            ) from None
                        if not failing:  # following: wait for Redis to come back
                            log.warning("Redis failed; the export retries: %r", exc)
                        failing.add(name)
                        last = None
                        await asyncio.sleep(POLL_SECS)
                    else:
                        failing.discard(name)
                    if last is not None:
                        idle = False
                    if not follow and (last is None or parse_id(last) >= ends[name]):
                        live.discard(name)
                    s = self.streams[name]
                    if s.open is not None and time.time() - s.opened >= self.rotate_secs:
                        self._complete(s)
                if follow and idle:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), POLL_SECS)
            for s in self.streams.values():
                self._complete(s)
            return self.summary
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
