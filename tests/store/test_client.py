"""The hiredis packer sends what redis-py's own packer would, and refuses what it
refuses."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import DataError

from recsvc.settings import Settings
from recsvc.store.client import HiredisPacking, connect, hiredis_packing

COMMANDS: list[tuple[Any, ...]] = [
    ("EVALSHA", "0" * 40, 2, "{u:a}:s", b"{u:a}:r", 1.5, -3, 1e-300, 1790000000.123, "é"),
    ("HMGET", "{i1.137}:idx", "a", "b", "c"),
    ("CONFIG GET", "proto-max-bulk-len"),
    ("SET", "k", b"\x00\r\n\xff", "EX", 60),
    ("ZREVRANGE", "{u:x}:r", 0, 99, "WITHSCORES"),
]


def _flat(chunks: list[bytes] | list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(c) for c in chunks)


@pytest.mark.parametrize("command", COMMANDS)
def test_one_command_packs_to_the_same_bytes(command: tuple[Any, ...]) -> None:
    plain = Connection()
    fast = hiredis_packing(Connection)()
    assert _flat(fast.pack_command(*command)) == _flat(plain.pack_command(*command))


def test_a_pipeline_packs_to_the_same_bytes() -> None:
    plain = Connection()
    fast = hiredis_packing(Connection)()
    assert _flat(fast.pack_commands(COMMANDS)) == _flat(plain.pack_commands(COMMANDS))


@pytest.mark.parametrize("bad", [None, [1], {"a": 1}])
def test_what_redis_py_refuses_is_refused(bad: object) -> None:
    with pytest.raises(DataError):
        Connection().pack_command("SET", "k", bad)
    with pytest.raises(DataError):
        hiredis_packing(Connection)().pack_command("SET", "k", bad)


def test_every_pool_connection_packs_with_hiredis() -> None:
    for url, base in (
        ("redis://127.0.0.1:1/0", Connection),
        ("unix:///tmp/none.sock", UnixDomainSocketConnection),
    ):
        client = connect(url, Settings())
        cls = client.connection_pool.connection_class
        assert issubclass(cls, HiredisPacking) and issubclass(cls, base)
