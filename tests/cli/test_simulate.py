"""`recsvc simulate` against a real service that needs API keys."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from features.synthetic import SyntheticConfig
from recsvc.cli.simulate import simulate
from tests.conftest import TEST_KEY

pytestmark = pytest.mark.asyncio


async def test_the_simulator_sends_its_key(client: TestClient[Any, Any]) -> None:
    host = str(client.make_url("")).rstrip("/")
    config = SyntheticConfig(n_users=400, n_items=300, n_events=1000, n_categories=12, seed=3)
    done = await simulate(host, 50, 10.0, 30, config, concurrency=2, key=TEST_KEY)
    assert done.requests == 30 and done.errors == 0
    refused = await simulate(host, 50, 10.0, 5, config, concurrency=1)  # no key: 401s
    assert refused.errors == refused.requests == 5
