"""Redis URLs: redis-py parses redis://, rediss:// and unix:// for one server; the
cluster forms ``redis+cluster://[user:password@]host:port[,host:port...]`` and
``rediss+cluster://`` (TLS) are parsed here into RedisCluster arguments."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio.cluster import ClusterNode

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def cluster_kwargs(url: str) -> dict[str, Any]:
    """RedisCluster kwargs for ``redis+cluster://[user:pass@]host:port[,host:port...][/0]``
    (redis-py parses only redis://, rediss://, unix://, and one host)."""
    scheme, _, rest = url.partition("://")
    parts = urlsplit(f"{CLUSTER_SCHEMES[scheme.lower()]}://{rest}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    if parts.path.strip("/") not in ("", "0") or parts.query:
        raise ValueError("a cluster URL takes no database and no options")
    nodes = []
    for hostport in hosts.split(","):
        host, colon, port = hostport.rpartition(":")
        if not colon or host.endswith(":"):  # no port (a bare name or IPv6 address)
            host, port = hostport, "6379"
        if not host.strip("[]"):
            raise ValueError("a cluster URL needs host:port (several, comma-separated)")
        nodes.append(ClusterNode(unquote(host.strip("[]")), int(port)))
    return {
        "startup_nodes": nodes,
        "username": unquote(user) or None,
        "password": unquote(password) or None,
        "ssl": parts.scheme == "rediss",
    }
