"""Run the app on uvloop until SIGINT/SIGTERM, then drain and close."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import uvloop
from aiohttp import web

from recsvc.app import create_app
from recsvc.settings import Settings

# In-flight requests get this long to finish after a stop signal.
SHUTDOWN_GRACE_SECS = 10.0


async def serve_until_stopped(
    settings: Settings, redis_url: str, on_ready: Callable[[str], None] | None = None
) -> None:
    app = create_app(settings, redis_url)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_SECS)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, settings.host, settings.port, backlog=1024)
        await site.start()
        if on_ready is not None:
            on_ready(f"http://{settings.host}:{settings.port}")
        await stop.wait()
    finally:
        await runner.cleanup()


def run(settings: Settings, redis_url: str, on_ready: Callable[[str], None] | None = None) -> None:
    uvloop.run(serve_until_stopped(settings, redis_url, on_ready))
