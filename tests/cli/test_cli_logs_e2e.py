"""A RetailRocket-layout log through the CLI as a user runs it: `recsvc train`,
`recsvc import`, `recsvc models list`, then the service serves the model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from features.synthetic import SyntheticData
from recsvc.ranking import models
from recsvc.web.app import create_app
from tests.conftest import settings_for
from tests.helpers import write_retailrocket

pytestmark = pytest.mark.e2e


def _recsvc(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSVC_")}
    return subprocess.run(
        [sys.executable, "-m", "recsvc", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


@pytest.mark.asyncio
async def test_a_retailrocket_log_trains_imports_and_serves(
    small_data: SyntheticData, tmp_path: Path, redis_url: str
) -> None:
    events, items = tmp_path / "rr-events.csv", tmp_path / "rr-items.csv"
    good = write_retailrocket(events, items, small_data, limit=6000)
    model_dir = tmp_path / "models"

    trained = _recsvc(
        "train",
        *("--events", events, "--items", items, "--model-dir", model_dir, "--name", "rr"),
        *("--trees", "30", "--train-groups", "2000"),
    )
    assert trained.returncode == 0, trained.stderr
    assert f"retailrocket layout, {good + 5} rows, {good} used, 5 skipped" in trained.stderr
    assert "unknown_event:wishlist 1" in trained.stderr and "served lists at 10" in trained.stderr
    [version] = models.versions(model_dir, "rr")
    meta = models.read_meta(version)
    assert meta["data"]["files"][1]["skipped"]["bad_id"] == 2
    assert meta["metrics"]["eval_groups"] > 50

    imported = _recsvc("import", "--events", events, "--items", items, "--redis-url", redis_url)
    assert imported.returncode == 0, imported.stderr
    assert f"imported {good} events" in imported.stderr
    again = _recsvc("import", "--events", events, "--redis-url", redis_url)
    assert again.returncode == 2 and "--append" in again.stderr

    listed = _recsvc("models", "list", "--model-dir", model_dir)
    assert listed.returncode == 0, listed.stderr
    [row] = [line for line in listed.stdout.splitlines() if line.startswith("rr ")]
    assert version.name in row and row.endswith("serving")

    visitor = next(line.split(",")[1] for line in events.read_text().splitlines()[1:3000:7])
    app = create_app(settings_for(model_dir, model_name="rr"), redis_url)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        body = await (await c.post("/v1/recommendations", json={"user_id": visitor})).json()
    assert body["strategy"] == "model", body
    assert body["model"] == {"name": "rr", "version": version.name}
    assert len(body["items"]) == 10


def test_not_a_log_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "photo.csv"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    result = _recsvc("train", "--events", path, "--model-dir", tmp_path / "m")
    assert result.returncode == 2
    assert "not an event log" in result.stderr and "Traceback" not in result.stderr
    missing = _recsvc("import", "--events", tmp_path / "nope.csv", "--redis-url", "unix:///x")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
