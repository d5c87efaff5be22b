"""Structured JSON log lines on stderr."""

from __future__ import annotations

import atexit
import copy
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

import orjson

from recsvc.ops import metrics

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return orjson.dumps(out, default=str).decode()


# Records waiting for the writer thread; beyond this, new ones are dropped (and
# counted) rather than growing memory behind a stalled stderr.
QUEUE_MAX = 10_000
_listener: logging.handlers.QueueListener | None = None


def _stop_listener() -> None:
    global _listener
    if _listener is not None:
        _listener.stop()  # writes what is queued
        _listener = None


def setup(level: str) -> None:
    """JSON lines on stderr, formatted and written by a thread: the event loop only
    queues a record, so a slow stderr (a pipe, a full disk) never stalls requests."""
    global _listener
    _stop_listener()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    records: queue.Queue[logging.LogRecord] = queue.Queue(QUEUE_MAX)
    _listener = logging.handlers.QueueListener(records, handler, respect_handler_level=True)
    _listener.start()
    atexit.unregister(_stop_listener)
    atexit.register(_stop_listener)
    root = logging.getLogger()
    root.handlers[:] = [_KeepExtras(records)]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.Formatter.converter = time.gmtime


class _KeepExtras(logging.handlers.QueueHandler):
    """QueueHandler that hands over a copy of the record with its extra fields (the
    JSON formatter in the writer thread needs them, and does the formatting)."""

    dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)  # other handlers may still read the original
        if record.args:  # merge arguments now: they may change after this returns
            record.msg, record.args = record.getMessage(), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_info = None  # tracebacks hold frames; the text is enough
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            _KeepExtras.dropped += 1
            metrics.LOG_LINES_DROPPED.inc()
