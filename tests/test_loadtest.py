"""The load test's SLO gate: its arithmetic, and locust itself against a real server
(a short run that must pass a generous SLO and fail an impossible one)."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from loadtest import bench, slo
from recsvc import seed
from recsvc.app import create_app
from recsvc.settings import Settings
from tests.conftest import SMALL, DataFiles, settings_for

LOCUSTFILE = Path(__file__).resolve().parent.parent / "loadtest" / "locustfile.py"


def _row(name: str, requests: int = 1000, failures: int = 0, p99: float = 12.0) -> slo.Row:
    return slo.Row(name, requests, failures, 500.0, 5.0, 9.0, p99, 40.0)


def test_gate_passes_within_the_slo_and_names_the_figures() -> None:
    passed, reasons = slo.verdict([_row(slo.RECOMMEND), _row(slo.EVENTS, p99=80)], 35, 0.001)
    assert passed, reasons
    assert "p99 12 ms <= SLO 35 ms" in reasons[0]


@pytest.mark.parametrize(
    ("rows", "reason"),
    [
        ([_row(slo.RECOMMEND, p99=36)], "p99 36 ms > SLO 35 ms"),
        ([_row(slo.RECOMMEND), _row(slo.EVENTS, failures=3)], "3 failures in 2000 requests"),
        ([_row(slo.EVENTS)], "no /v1/recommendations requests"),
        ([_row(slo.RECOMMEND, requests=0)], "no /v1/recommendations requests"),
    ],
)
def test_gate_fails_with_the_reason(rows: list[slo.Row], reason: str) -> None:
    passed, reasons = slo.verdict(rows, 35, 0.001)
    assert not passed and any(reason in r for r in reasons), reasons


def test_the_table_has_a_row_per_endpoint() -> None:
    lines = slo.table([_row(slo.EVENTS), _row(slo.RECOMMEND)]).splitlines()
    assert lines[0].split() == [
        "endpoint",
        "requests",
        "RPS",
        "p50",
        "p95",
        "p99",
        "max",
        "failures",
    ]
    assert lines[2].split()[0] == slo.RECOMMEND


async def _locust(host: str, results: Path, slo_ms: str) -> tuple[int, str, dict[str, Any]]:
    env = {
        "RECSVC_SLO_P99_MS": slo_ms,
        "RECSVC_LOADTEST_KNOWN_USERS": "400",
        "RECSVC_LOADTEST_ITEMS": "300",
        "RECSVC_LOADTEST_CANDIDATES": "50",
        "RECSVC_LOADTEST_RESULTS": str(results),
        "PATH": "/usr/bin:/bin",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary"),
        *("-u", "4", "-r", "4", "--run-time", "3s", "--stop-timeout", "2", "--host", host),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=90)
    summary = json.loads((results / "summary.json").read_text())
    return proc.returncode or 0, out.decode(errors="replace"), summary


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_locust_run_passes_a_generous_slo_and_fails_an_impossible_one(
    seeded: Redis, redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    server = TestServer(create_app(settings_for(model_dir), redis_url), host="127.0.0.1")
    await server.start_server()
    try:
        host = str(server.make_url("")).rstrip("/")
        code, out, summary = await _locust(host, tmp_path / "ok", "10000")
        assert code == 0, out
        assert "PASS:" in out and "endpoint" in out
        names = {r["name"] for r in summary["rows"]}
        assert names == {slo.RECOMMEND, slo.EVENTS}
        assert all(r["failures"] == 0 for r in summary["rows"])
        code, out, summary = await _locust(host, tmp_path / "impossible", "0.1")
        assert code == 1, out
        assert "FAIL:" in out and summary["passed"] is False
    finally:
        await server.close()


@pytest.mark.asyncio
async def test_the_stage_benchmark_runs_on_a_tiny_shop(
    redis_url: str,
    small_files: DataFiles,
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """loadtest/bench.py end to end at a tiny size, so it cannot rot unnoticed."""
    data_dir = tmp_path / "data"
    events, items = seed.synthetic_paths(data_dir)
    events.parent.mkdir(parents=True)
    shutil.copy(small_files.events, events)
    shutil.copy(small_files.items, items)
    shutil.copytree(model_dir, data_dir / "models")
    settings = Settings(data_dir=data_dir)
    await bench.run(redis_url, settings, 30, 10, ["native"], sizes=(50,), n_users=SMALL.n_users)
    out = capsys.readouterr().out
    [row] = [line.split() for line in out.splitlines() if line.startswith("native")]
    assert row[1] == "50" and len(row) >= 11, out
    p50, p99, share = float(row[8]), float(row[9]), float(row[11])
    assert 0 < p50 <= p99 and share > 50.0, out
