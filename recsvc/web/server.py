"""Run the app on uvloop until SIGINT/SIGTERM, then drain and close; optionally as
N worker processes sharing one port (SO_REUSEPORT: the kernel spreads connections)."""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from types import FrameType

import orjson
import uvloop
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from recsvc.ab.experiments import ExperimentsError
from recsvc.ops import logs, metrics
from recsvc.settings import Settings
from recsvc.store.feature_store import IncompatibleStore
from recsvc.web import appkeys
from recsvc.web.app import create_app, create_metrics_app
from recsvc.web.frontdoor import install_front_door, stamp_arrivals

log = logging.getLogger(__name__)
# In-flight requests get this long to finish after a stop signal.
SHUTDOWN_GRACE_SECS = 10.0
# After an answer sent before the request body was read in full (a 408 for a
# body that did not arrive in time, a 413), aiohttp reads and discards what
# the client still sends for this long, so that the client sees the answer
# rather than a reset, then closes (aiohttp's default is 10 s per connection).
LINGERING_SECS = 1.0
# How long the parent waits for workers to listen, and to exit after a stop.
WORKER_START_SECS = 120.0


MALFORMED = orjson.dumps(
    {"error": {"code": "bad_request", "message": "malformed HTTP request", "field": None}}
)


class _QuietHandler(RequestHandler):
    """aiohttp's connection handler, but a request it cannot parse gets a JSON
    400 and a one-line debug log. aiohttp's own answer and error log quote the
    parser's message, which quotes the offending bytes: a header line that may
    hold an API key (a key file saved with a trailing CR, a header past 8 KB)."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError) or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        log.debug("malformed HTTP request: %s", type(exc).__name__)
        metrics.observe_http("malformed", "other", status, 0.0)
        response = web.Response(status=status, body=MALFORMED, content_type="application/json")
        response.force_close()
        return response


class _QuietServer(web.Server):
    """A web.Server whose connections are _QuietHandlers."""

    def __call__(self) -> RequestHandler:
        return _QuietHandler(self, loop=self._loop, **self._kwargs)


async def setup_runner(app: web.Application) -> web.AppRunner:
    """The app's runner, set up (the app's resources started), with every
    request stamped with its arrival time and recommendations admitted (or
    turned away) before routing (recsvc.admission)."""
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=SHUTDOWN_GRACE_SECS,
        lingering_time=LINGERING_SECS,
    )
    await runner.setup()
    assert runner.server is not None  # set up above
    runner.server.__class__ = _QuietServer  # aiohttp builds the Server; no hook for its class
    stamp_arrivals(runner.server)
    settings = app[appkeys.SETTINGS]
    reject = settings.overload_response == "reject"
    origins = frozenset(settings.cors_origin_list)
    install_front_door(runner.server, app[appkeys.ADMISSION], reject, origins, app[appkeys.ACCESS])
    return runner


async def serve_until_stopped(
    settings: Settings,
    redis_url: str,
    on_ready: Callable[[str], None] | None = None,
    reuse_port: bool = False,
) -> None:
    settings.check_exposure()  # before anything listens
    app = create_app(settings, redis_url)
    runner = await setup_runner(app)
    metrics_runner: web.AppRunner | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(
            runner, settings.host, settings.port, backlog=1024, reuse_port=reuse_port or None
        )
        await site.start()
        if settings.metrics_port:
            # Every worker binds it too (SO_REUSEPORT): whichever answers a scrape
            # reads all workers' files (recsvc.ops.metrics).
            metrics_runner = web.AppRunner(create_metrics_app(app), access_log=None)
            await metrics_runner.setup()
            metrics_site = web.TCPSite(
                metrics_runner, settings.host, settings.metrics_port, reuse_port=reuse_port or None
            )
            await metrics_site.start()
        # Everything built at start (item table, models, modules) is long-lived:
        # freezing it keeps the cyclic GC from rescanning it in full collections,
        # which otherwise show up as multi-millisecond pauses in the latency tail.
        gc.collect()
        gc.freeze()
        model = app[appkeys.MODELS].current
        log.info(
            "listening",
            extra={
                "url": f"http://{settings.host}:{settings.port}",
                "pid": os.getpid(),
                "model": f"{model.name}/{model.version}" if model else None,
                "items": app[appkeys.ITEMS].view.table.count,
                "metrics": "multiprocess" if metrics.MULTIPROCESS else "single process",
                "metrics_port": settings.metrics_port or settings.port,
                "api_keys": app[appkeys.ACCESS].enforced,
            },
        )
        if on_ready is not None:
            on_ready(f"http://{settings.host}:{settings.port}")
        await stop.wait()
    finally:
        log.info("stopping", extra={"pid": os.getpid()})
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()


class WorkerError(RuntimeError):
    """A worker process died or never listened; the service stops."""


def _worker(settings: Settings, redis_url: str) -> None:
    """One worker process: its own event loop, Redis pools, models (loaded after
    the process starts, LightGBM on one thread) and item cache."""
    logs.setup(settings.log_level)
    try:
        uvloop.run(serve_until_stopped(settings, redis_url, reuse_port=True))
    except (ExperimentsError, IncompatibleStore) as exc:  # a start-up refusal, not a crash
        print(f"recsvc worker: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def run_workers(
    settings: Settings,
    redis_url: str,
    workers: int,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Start ``workers`` processes on one port and supervise them: a stop signal is
    passed on to every worker; if one dies, the others are stopped and this raises
    (a supervisor such as systemd or Kubernetes restarts the whole service)."""
    # Before the workers start: they choose their metrics storage on import.
    metrics.prepare_multiprocess(settings.metrics_path)
    ctx = multiprocessing.get_context("spawn")  # nothing inherited but the arguments
    procs = [
        ctx.Process(target=_worker, args=(settings, redis_url), name=f"recsvc-worker-{k}")
        for k in range(workers)
    ]
    stopping = False

    def _stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            p.start()
        started = time.monotonic()
        announced = False
        while not stopping:
            if not announced and _listening(settings.host, settings.port):
                announced = True
                log.info("workers started", extra={"workers": workers, "port": settings.port})
                if on_ready is not None:
                    on_ready(f"http://{settings.host}:{settings.port}")
            dead = [p for p in procs if not p.is_alive()]
            if dead:
                raise WorkerError(
                    f"worker {dead[0].name} exited with code {dead[0].exitcode} (see its log above)"
                )
            if not announced and time.monotonic() - started > WORKER_START_SECS:
                raise WorkerError(f"workers did not listen within {WORKER_START_SECS:.0f} s")
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: the worker drains and closes
        deadline = time.monotonic() + SHUTDOWN_GRACE_SECS + 5.0
        for p in procs:
            p.join(max(deadline - time.monotonic(), 0.1))
            if p.is_alive():
                p.kill()
                p.join()
            if p.pid is not None:
                metrics.worker_exited(p.pid)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(
    settings: Settings,
    redis_url: str,
    on_ready: Callable[[str], None] | None = None,
    workers: int = 1,
) -> None:
    if settings.check_exposure():  # refused (SettingsError) before any worker starts
        log.warning(
            "serving without API keys on a non-loopback address (RECSVC_INSECURE=1)",
            extra={"host": settings.host},
        )
    if workers > 1:
        run_workers(settings, redis_url, workers, on_ready)
    else:
        uvloop.run(serve_until_stopped(settings, redis_url, on_ready))
