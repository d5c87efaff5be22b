"""Structured JSON log lines on stderr."""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

import orjson

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


_listener: logging.handlers.QueueListener | None = None


def setup(level: str) -> None:
    """JSON lines on stderr, formatted and written by a thread: the event loop only
    queues a record, so a slow stderr (a pipe, a full disk) never stalls requests."""
    global _listener
    if _listener is not None:
        _listener.stop()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(records, handler, respect_handler_level=True)
    _listener.start()
    atexit.register(_listener.stop)  # flush what is queued at exit
    root = logging.getLogger()
    root.handlers[:] = [_KeepExtras(records)]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.Formatter.converter = time.gmtime


class _KeepExtras(logging.handlers.QueueHandler):
    """QueueHandler that hands the record over as it is (the JSON formatter in the
    writer thread needs its extra fields and exception, and does the formatting)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.args:  # merge arguments now: they may change after this returns
            record.msg, record.args = record.getMessage(), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_info = None  # tracebacks hold frames; the text is enough
        return record
