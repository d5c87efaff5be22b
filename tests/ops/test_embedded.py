"""The embedded redis-server starts, serves, and never outlives its owner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from recsvc.ops.embedded import EmbeddedRedis, EmbeddedRedisError, find_binary


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited all the same.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_start_serve_stop_leaves_nothing(tmp_path: object) -> None:
    server = EmbeddedRedis().start()
    pid, sock = server.pid, server.socket
    assert pid is not None
    assert redis.Redis(unix_socket_path=str(sock)).ping()
    server.stop()
    assert not _alive(pid)
    assert not sock.exists()


def test_data_dir_persists_between_starts(tmp_path: object) -> None:
    from pathlib import Path

    data = Path(str(tmp_path)) / "redis"
    with EmbeddedRedis(data) as a:
        redis.Redis.from_url(a.url).set("k", "v")
    with EmbeddedRedis(data) as b:
        assert redis.Redis.from_url(b.url).get("k") == b"v"


def test_missing_binary_is_a_clear_error() -> None:
    with pytest.raises(EmbeddedRedisError, match="RECSVC_REDIS_SERVER_BIN"):
        find_binary("/nonexistent/redis-server")


@pytest.mark.parametrize("how", ["sigkill", "sigterm", "exception"])
def test_server_dies_with_its_owner(how: str) -> None:
    code = (
        "import os, signal, sys, time\n"
        "from recsvc.ops.embedded import EmbeddedRedis\n"
        "r = EmbeddedRedis().start()\n"
        "print(r.pid, flush=True)\n"
        f"how = {how!r}\n"
        "if how == 'exception':\n"
        "    with r:\n"
        "        raise SystemExit(3)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    pid = int(proc.stdout.readline())
    assert _alive(pid)
    if how == "sigkill":
        proc.send_signal(signal.SIGKILL)
    elif how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    proc.stdout.close()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)
