"""Shared fixtures: a real redis-server, small generated data, a real LightGBM model,
and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import redis
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from features.dataset import DatasetConfig
from features.logs import write_catalogue, write_events
from features.synthetic import SyntheticConfig, SyntheticData, generate
from features.trainer import TrainParams
from recsvc.cli import training
from recsvc.cli.seed import seed
from recsvc.ops import logs
from recsvc.ops.embedded import EmbeddedRedis
from recsvc.settings import Settings
from recsvc.web.app import create_app


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """A test that runs `cli.main` in-process installs the JSON log writer thread on
    the stderr pytest captured; stop it and restore the root logger afterwards, so a
    later test's log record is not written to a closed capture."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    logs._stop_listener()
    root.handlers[:] = handlers
    root.setLevel(level)


SMALL = SyntheticConfig(n_users=400, n_items=300, n_events=25_000, n_categories=12, seed=3)
# The small log ends when the session starts, so served features look live.
END_TS = float(int(time.time()))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest_asyncio.fixture
async def aredis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def small_data() -> SyntheticData:
    return generate(SMALL, end_ts=END_TS)


@dataclass(frozen=True)
class DataFiles:
    events: Path
    items: Path


@pytest.fixture(scope="session")
def small_files(small_data: SyntheticData, tmp_path_factory: pytest.TempPathFactory) -> DataFiles:
    base = tmp_path_factory.mktemp("data")
    files = DataFiles(base / "events.csv", base / "items.csv")
    write_events(files.events, small_data.events)
    write_catalogue(files.items, small_data.catalogue)
    return files


@pytest.fixture(scope="session")
def model_dir(small_files: DataFiles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model registry holding one real model trained on the small log."""
    root = tmp_path_factory.mktemp("models")
    training.train_files(
        small_files.events,
        small_files.items,
        root,
        "ranker",
        DatasetConfig(train_groups=3000, eval_groups=800),
        TrainParams(num_trees=60, num_threads=2),
        progress=False,
    )
    return root


def settings_for(model_dir: Path, **overrides: object) -> Settings:
    """Test settings: fast polling, data (and the scorer cache) next to the models,
    the native scorer unless a test asks for the compiled one (tests/ranking/test_scoring.py),
    and a read deadline and admission target that a hiccup of this shared machine
    does not trip (the fallback tests use a dead Redis, which fails at once)."""
    return Settings(
        model_dir=model_dir,
        data_dir=model_dir.parent / "data",
        model_poll_secs=0.2,
        item_refresh_secs=0.2,
        scorer="native",
        redis_timeout_ms=1000.0,
        request_deadline_ms=2000.0,
        admission_target_ms=2000.0,
    ).replace(**overrides)


@pytest_asyncio.fixture
async def seeded(aredis: Redis, small_data: SyntheticData) -> Redis:
    await seed(
        aredis, Settings(user_ttl_days=0), small_data.catalogue, small_data.events, progress=False
    )
    return aredis


# The `client` fixture's server has API keys configured and its client sends
# this one, which holds every scope (tests/web/test_access_e2e.py tests the rest).
TEST_KEY_NAME = "test-all"
TEST_KEY = "test-key-with-every-scope-0123456789"
TEST_KEYS = f"{TEST_KEY_NAME}:recommend+events+features+admin:{TEST_KEY}"
TEST_AUTH = {"Authorization": f"Bearer {TEST_KEY}"}


@pytest_asyncio.fixture
async def client(
    seeded: Redis, redis_url: str, model_dir: Path
) -> AsyncIterator[TestClient[object, object]]:
    """HTTP client of a real server on 127.0.0.1 over seeded Redis and the small
    model; the server needs API keys, and the client sends TEST_KEY. Events
    create the items they name (the parity tests replay logs with items outside
    the catalogue); tests/service/test_integrity.py tests the policy."""
    app = create_app(settings_for(model_dir, api_keys=TEST_KEYS, unknown_items="create"), redis_url)
    async with TestClient(TestServer(app, host="127.0.0.1"), headers=TEST_AUTH) as c:
        yield c
