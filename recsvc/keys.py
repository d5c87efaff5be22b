"""API keys: who may call which group of routes (a scope).

Keys come from ``RECSVC_API_KEYS`` (compact: ``name:scope+scope:key,...``),
from ``RECSVC_API_KEYS_FILE`` (TOML ``[[keys]]`` tables or a JSON list of
``{"name", "key" or "sha256", "scopes"}``), and from ``RECSVC_ADMIN_TOKEN``
(the key ``admin-token`` with the ``admin`` scope). Several keys may share a
scope, which is how a key is rotated: add the new one, move the callers, drop
the old one. A key's name goes into logs and metrics; the key itself never does,
nor into any message.

A key is looked up by its SHA-256 digest: what a caller can vary is the digest
of its guess, which says nothing about a key, so the lookup is one dict access
whose time does not depend on how much of a key was guessed right.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECOMMEND, EVENTS, FEATURES, ADMIN = "recommend", "events", "features", "admin"
SCOPES = (RECOMMEND, EVENTS, FEATURES, ADMIN)
# Sixteen characters of a random token68 alphabet is ~95 bits: guessing is out.
MIN_KEY_LENGTH = 16
# RFC 6750's bearer token alphabet (token68): safe in a header, and without the
# compact form's separators (',' and ':').
KEY_PATTERN = re.compile(r"[A-Za-z0-9._~+/=-]+")
# Names become metric label values and log fields: short and plain.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
DIGEST_PATTERN = re.compile(r"[0-9a-f]{64}")
ADMIN_TOKEN_NAME = "admin-token"
LOOPBACK_NAMES = frozenset({"localhost"})


class KeysError(ValueError):
    """A key definition that cannot be used; the message names it, never the key."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    scopes: frozenset[str]
    # SHA-256 of the key; the key itself is not kept.
    digest: bytes = field(repr=False)


def digest(key: str) -> bytes:
    # surrogateescape: aiohttp decodes non-UTF-8 header bytes that way.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _key(
    name: str, scopes: Iterable[str], key: str | None, sha256: str | None, where: str
) -> ApiKey:
    # Messages name the entry, never a field's value: fields in the wrong order
    # put the key where the name or a scope belongs.
    if not NAME_PATTERN.fullmatch(name):
        raise KeysError(f"{where}: the name is not 1-64 of A-Z a-z 0-9 _ . -")
    listed = list(scopes)
    if not listed or not set(listed) <= set(SCOPES):
        raise KeysError(f"{where}: every scope must be one of {', '.join(SCOPES)}")
    if (key is None) == (sha256 is None):
        raise KeysError(f"{where}: give exactly one of key and sha256")
    if sha256 is not None:
        if not DIGEST_PATTERN.fullmatch(sha256):
            raise KeysError(f"{where}: sha256 is not 64 lowercase hex digits")
        return ApiKey(name, frozenset(listed), bytes.fromhex(sha256))
    assert key is not None
    if len(key) < MIN_KEY_LENGTH:
        raise KeysError(
            f"{where}: the key has {len(key)} characters; at least {MIN_KEY_LENGTH} are required"
        )
    if not KEY_PATTERN.fullmatch(key):
        raise KeysError(f"{where}: the key may only hold A-Z a-z 0-9 . _ ~ + / = -")
    return ApiKey(name, frozenset(listed), digest(key))


def parse_compact(text: str, where: str = "RECSVC_API_KEYS") -> list[ApiKey]:
    """``name:scope+scope:key`` entries separated by commas (spaces ignored)."""
    out = []
    for k, entry in enumerate(filter(None, (e.strip() for e in text.split(","))), 1):
        parts = entry.split(":")
        if len(parts) != 3:
            raise KeysError(f"{where}: entry {k} is not name:scope+scope:key")
        name, scopes, key = (p.strip() for p in parts)
        out.append(_key(name, filter(None, scopes.split("+")), key, None, f"{where} entry {k}"))
    return out


def read_file(path: Path) -> list[ApiKey]:
    """Keys from a TOML file (``[[keys]]`` tables) or, for a ``.json`` file, a JSON
    list of objects (or ``{"keys": [...]}``); each has name, scopes and key or sha256."""
    where = f"RECSVC_API_KEYS_FILE={path}"
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM, as some editors write, is fine
    except OSError as exc:
        raise KeysError(f"{where}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise KeysError(f"{where}: not UTF-8 text") from None
    kind = "JSON" if path.suffix == ".json" else "TOML"
    try:
        data: Any = json.loads(text) if kind == "JSON" else tomllib.loads(text)
    except ValueError as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError: no file text
        raise KeysError(f"{where}: not valid {kind}: {exc}") from None
    entries = data.get("keys") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise KeysError(f"{where}: expected a list of keys ([[keys]] tables in TOML)")
    if not entries:  # a file given to hold keys: empty is a mistake, not "no keys"
        raise KeysError(f"{where}: holds no keys")
    out = []
    for k, entry in enumerate(entries, 1):
        at = f"{where} entry {k}"
        if not isinstance(entry, dict) or not set(entry) <= {"name", "key", "sha256", "scopes"}:
            raise KeysError(f"{at}: expected a table of name, scopes, and key or sha256")
        name, scopes = entry.get("name"), entry.get("scopes")
        key, sha256 = entry.get("key"), entry.get("sha256")
        if not isinstance(name, str) or not isinstance(scopes, list):
            raise KeysError(f"{at}: name must be a string and scopes a list")
        if not all(isinstance(v, str | None) for v in (key, sha256)) or not all(
            isinstance(s, str) for s in scopes
        ):
            raise KeysError(f"{at}: key, sha256 and scopes must be strings")
        out.append(_key(name, scopes, key, sha256, at))
    return out


@dataclass(frozen=True, slots=True)
class KeyRing:
    """Every configured key by digest. ``enforced``: keys other than the admin
    token exist, so the API routes need one (the admin token alone guards only
    /admin, as it always did)."""

    by_digest: Mapping[bytes, ApiKey]
    enforced: bool

    @property
    def keys(self) -> list[ApiKey]:
        return sorted(self.by_digest.values(), key=lambda k: k.name)

    def has_scope(self, scope: str) -> bool:
        return any(scope in k.scopes for k in self.by_digest.values())

    def lookup(self, key: str) -> ApiKey | None:
        return self.by_digest.get(digest(key))


def keyring(compact: str, path: Path | None, admin_token: str) -> KeyRing:
    """All keys, checked: unique names, no key under two names."""
    keys = parse_compact(compact)
    if path is not None:
        keys += read_file(path)
    enforced = bool(keys)
    if admin_token:
        keys.append(ApiKey(ADMIN_TOKEN_NAME, frozenset({ADMIN}), digest(admin_token)))
    names: set[str] = set()
    by_digest: dict[bytes, ApiKey] = {}
    where = "RECSVC_API_KEYS, RECSVC_API_KEYS_FILE, RECSVC_ADMIN_TOKEN"
    for key in keys:
        if key.name in names:
            raise KeysError(f"{where}: the key name {key.name!r} is used twice")
        if key.digest in by_digest:
            raise KeysError(
                f"{where}: keys {by_digest[key.digest].name!r} and {key.name!r} are the same key"
            )
        names.add(key.name)
        by_digest[key.digest] = key
    return KeyRing(by_digest, enforced)


def is_loopback(host: str) -> bool:
    """Whether ``host`` can only be reached from this machine (an empty host, like
    0.0.0.0 and ::, means every interface)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything
