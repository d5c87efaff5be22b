"""`recsvc serve --workers 2` with API keys and RECSVC_METRICS_PORT: two processes
on one port serve, both bind the metrics port too, their metrics add up in
whichever answers a scrape, and a stop signal stops them all."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from tests.cli.test_cli_e2e import _free_port
from tests.conftest import TEST_AUTH, TEST_KEYS
from tests.helpers import serve_command

pytestmark = pytest.mark.e2e


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def _post(port: int, body: dict[str, str]) -> urllib.request.Request:
    return urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/recommendations",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **TEST_AUTH},
    )


def test_two_workers_share_the_port_and_stop_together(
    seeded: Redis, redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    port, metrics_port = _free_port(), _free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"a previous run's counts")
    argv, env = serve_command(
        port,
        redis_url,
        model_dir,
        tmp_path,
        "--workers",
        "2",
        api_keys=TEST_KEYS,
        metrics_port=str(metrics_port),
    )
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(_post(port, {"user_id": "u1"}), timeout=2) as resp:
                    body = json.loads(resp.read())
                    break
            except OSError:
                time.sleep(0.3)
        assert body is not None and body["strategy"] == "model"
        workers = _children(proc.pid)
        assert len(workers) >= 2  # two workers (plus, possibly, multiprocessing's tracker)
        for _ in range(40):  # every request answered, whichever worker took it
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                assert r.status == 200
        assert not (metrics_dir / "counter_1.db").exists()  # emptied at start
        # Each urlopen is a new connection, which the kernel gives to either worker.
        for k in range(60):
            fallback = {"user_id": f"nobody-{k}"}
            with urllib.request.urlopen(_post(port, fallback), timeout=5) as resp:
                assert json.loads(resp.read())["fallback_reason"] == "unknown_user"
        served_by = {f.stem.rsplit("_", 1)[1] for f in metrics_dir.glob("histogram_*.db")}
        assert len(served_by) == 2, served_by  # both workers answered some
        # Not on the main port, whatever the key; on the metrics port, without one.
        scrape = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=TEST_AUTH)
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(scrape, timeout=5)
        for _ in range(6):  # whichever worker answers the scrape, the sums are the same
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
                samples = {
                    (s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in text_string_to_metric_families(r.read().decode())
                    for s in family.samples
                }
            reason = (("reason", "unknown_user"),)
            assert samples[("recsvc_fallbacks_total", reason)] == 60
            count = "recsvc_recommendation_duration_seconds_count"
            labels = (("strategy", "model"),)
            assert samples[(count, labels)] == 1
            loaded = [k for k, v in samples.items() if k[0] == "recsvc_model_loaded" and v == 1]
            assert len(loaded) == 1
            let_in = (("key", "test-all"), ("scope", "recommend"))
            assert samples[("recsvc_api_requests_total", let_in)] == 61
        # Each worker holds the metrics port (SO_REUSEPORT), so none is a single point.
        listening = subprocess.run(
            ["ss", "-Hltn", f"sport = :{metrics_port}"], capture_output=True, text=True, check=False
        ).stdout
        assert len(listening.splitlines()) == 2, listening
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0
    for _ in range(50):  # a worker exits before the parent; helpers just after it
        alive = [pid for pid in workers if _running(pid)]
        if not alive:
            break
        time.sleep(0.1)
    assert not alive, [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in alive]
