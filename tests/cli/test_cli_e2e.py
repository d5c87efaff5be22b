"""`recsvc demo` as a user runs it: a subprocess, real HTTP, signals, restarts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.ops.test_embedded import _alive

pytestmark = pytest.mark.e2e
SMALL_DEMO = [
    "--users",
    "300",
    "--items",
    "200",
    "--events",
    "12000",
    "--trees",
    "40",
    "--train-groups",
    "1500",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Demo:
    def __init__(self, data_dir: Path, port: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECSVC_")}
        self.log = data_dir.parent / f"demo-{time.monotonic_ns()}.log"
        self.url = f"http://127.0.0.1:{port}"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "recsvc",
                    "demo",
                    "--port",
                    str(port),
                    "--data-dir",
                    str(data_dir),
                    *SMALL_DEMO,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_serving(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.text()
            if "recsvc is serving" in self.text():
                return
            time.sleep(0.1)
        raise AssertionError(self.text())

    def redis_pid(self) -> int:
        for line in self.text().splitlines():
            if "embedded redis-server started" in line:
                return int(json.loads(line)["pid"])
        raise AssertionError(self.text())

    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            self.url + "/v1/recommendations",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return dict(json.loads(resp.read()))

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


def test_demo_serves_then_restarts_from_its_own_data(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = Demo(data, _free_port())
    try:
        first.wait_serving()
        body = first.post({"user_id": "u1", "n": 10})
        assert body["strategy"] == "model"
        assert len({i["item_id"] for i in body["items"]}) == 10
        unknown = first.post({"user_id": "nobody-123"})
        assert (unknown["strategy"], unknown["fallback_reason"]) == ("fallback", "unknown_user")
        redis_pid = first.redis_pid()
        assert first.stop(signal.SIGTERM) == 0
        assert not _alive(redis_pid)
        assert "seeded" in first.text() and "trained" in first.text()
    finally:
        if first.proc.poll() is None:
            first.proc.kill()

    second = Demo(data, _free_port())
    try:
        second.wait_serving()
        assert "already holds item data" in second.text()
        assert "trained" not in second.text()
        assert second.post({"user_id": "u1"})["strategy"] == "model"
        redis_pid = second.redis_pid()
        second.stop(signal.SIGINT)
        assert not _alive(redis_pid)
    finally:
        if second.proc.poll() is None:
            second.proc.kill()
