"""Lua scripts: loaded from ``lua/``, sent as EVALSHA in one pipeline (one round
trip per node), reloaded where a node answers NOSCRIPT."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any, TypeAlias

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from recsvc.store.client import RedisClient


def source(name: str) -> str:
    """The text of ``lua/<name>``."""
    return resources.files("recsvc.store").joinpath("lua", name).read_text()


ScriptCall: TypeAlias = tuple[AsyncScript, Sequence[Any], Sequence[Any]]


async def run_scripts(
    client: RedisClient, calls: Sequence[ScriptCall], raise_on_error: bool = True
) -> list[Any]:
    """Script calls in one pipeline (one round trip per node), replies in order.

    EVALSHA goes through execute_command: ClusterPipeline blocks .evalsha() and
    has no script preloading. A NOSCRIPT reply means that call did not run; the
    scripts are loaded (on every primary) and only those calls are sent again.
    An error reply raises, or with ``raise_on_error`` False stands in its place.
    """
    pipe = client.pipeline(transaction=False)
    for script, ks, argv in calls:
        pipe.execute_command("EVALSHA", script.sha, len(ks), *ks, *argv)
    replies = list(await pipe.execute(raise_on_error=False))
    missing = [k for k, r in enumerate(replies) if isinstance(r, NoScriptError)]
    if missing:
        for script in {id(calls[k][0]): calls[k][0] for k in missing}.values():
            script.sha = await client.script_load(script.script)
        pipe = client.pipeline(transaction=False)
        for k in missing:
            script, ks, argv = calls[k]
            pipe.execute_command("EVALSHA", script.sha, len(ks), *ks, *argv)
        for k, reply in zip(missing, await pipe.execute(raise_on_error=False), strict=True):
            replies[k] = reply
    if raise_on_error:
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
    return replies
