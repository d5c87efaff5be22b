"""API key definitions (recsvc.keys), their checks at start, and the refusal to
serve a non-loopback address without keys."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from recsvc import keys
from recsvc.cli import main as cli
from recsvc.settings import Settings, SettingsError, from_env

KEY = "k" * 16
OTHER = "0123456789abcdef-other"


def test_the_compact_form_gives_names_scopes_and_digests_only() -> None:
    ring = keys.keyring(f"web:recommend+events:{KEY}, ops:admin:{OTHER}", None, "")
    assert [(k.name, sorted(k.scopes)) for k in ring.keys] == [
        ("ops", ["admin"]),
        ("web", ["events", "recommend"]),
    ]
    assert ring.enforced and ring.has_scope("admin")
    assert ring.lookup(KEY) is not None and ring.lookup(KEY)
    assert ring.lookup(KEY + "x") is None and ring.lookup("") is None
    assert KEY not in repr(ring) and OTHER not in repr(ring)


def test_a_toml_or_json_file_adds_keys_and_may_hold_digests_only(tmp_path: Path) -> None:
    toml = tmp_path / "keys.toml"
    digest = hashlib.sha256(OTHER.encode()).hexdigest()
    toml.write_text(
        f'[[keys]]\nname = "web"\nkey = "{KEY}"\nscopes = ["recommend"]\n\n'
        f'[[keys]]\nname = "ops"\nsha256 = "{digest}"\nscopes = ["admin", "features"]\n'
    )
    ring = keys.keyring("", toml, "")
    assert ring.lookup(OTHER) is not None and ring.lookup(OTHER).name == "ops"  # type: ignore[union-attr]
    listed = tmp_path / "keys.json"
    listed.write_text(json.dumps([{"name": "web", "key": KEY, "scopes": ["events"]}]))
    assert keys.keyring("", listed, "").lookup(KEY) is not None
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"keys": [{"name": "web", "key": KEY, "scopes": ["events"]}]}))
    assert keys.keyring("", wrapped, "").lookup(KEY) is not None


def test_the_admin_token_is_a_key_that_alone_enforces_nothing() -> None:
    ring = keys.keyring("", None, OTHER)
    found = ring.lookup(OTHER)
    assert found is not None and found.name == "admin-token" and found.scopes == {"admin"}
    assert not ring.enforced and ring.has_scope("admin")


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        ("web:recommend:short-key", "has 9 characters; at least 16"),
        (f"web:recommend:{KEY},web:events:{OTHER}", "'web' is used twice"),
        (f"web:recommend:{KEY},app:events:{KEY}", "'web' and 'app' are the same key"),
        (f"web:recommend+reads:{KEY}", "every scope must be one of recommend"),
        (f"web::{KEY}", "every scope must be one of"),
        # Fields in the wrong order (from the outside review): the key is never echoed.
        (f"web:{KEY}:recommend", "every scope must be one of"),
        (f"{KEY}:recommend:web", "the key has 3 characters"),
        (f"{KEY}x{KEY}{KEY}{KEY}:recommend:web", "the name is not 1-64"),
        (f"web:recommend:{KEY}:x", "entry 1 is not name:scope+scope:key"),
        (f"we b:recommend:{KEY}", "is not 1-64 of"),
        ("web:recommend:" + "é" * 20, "may only hold"),
    ],
)
def test_a_bad_key_stops_start_up_naming_the_problem_not_the_key(
    setting: str, problem: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        from_env({"RECSVC_API_KEYS": setting})
    message = str(caught.value)
    assert problem in message and "RECSVC_API_KEYS" in message
    assert KEY not in message and OTHER not in message and "short-key" not in message


def test_a_bad_key_file_names_the_file_and_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(f'[[keys]]\nname = "web"\nkey = "{KEY}"\nscopes = "recommend"\n')
    with pytest.raises(SettingsError, match=r"keys.toml entry 1: name must be a string and scopes"):
        from_env({"RECSVC_API_KEYS_FILE": str(path)})
    with pytest.raises(SettingsError, match="cannot be read"):
        from_env({"RECSVC_API_KEYS_FILE": str(tmp_path / "missing.toml")})
    # From the outside review: a Latin-1 file was a traceback, a BOM "not valid
    # TOML", an empty file silently "no keys" (every route open on loopback).
    path.write_bytes(b'[[keys]]\nname = "w\xe9b"\n')
    with pytest.raises(SettingsError, match="not UTF-8 text"):
        from_env({"RECSVC_API_KEYS_FILE": str(path)})
    path.write_text("keys = []\n")
    with pytest.raises(SettingsError, match="holds no keys"):
        from_env({"RECSVC_API_KEYS_FILE": str(path)})
    path.write_text(f'\ufeff[[keys]]\nname = "web"\nkey = "{KEY}"\nscopes = ["recommend"]\n')
    assert from_env({"RECSVC_API_KEYS_FILE": str(path)}).api_keys_file == path
    path.write_text("[[keys]\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        from_env({"RECSVC_API_KEYS_FILE": str(path)})


def test_settings_never_show_the_keys() -> None:
    settings = from_env({"RECSVC_API_KEYS": f"web:recommend:{KEY}", "RECSVC_ADMIN_TOKEN": OTHER})
    assert KEY not in repr(settings) and OTHER not in repr(settings)
    with pytest.raises(SettingsError) as caught:
        from_env({"RECSVC_ADMIN_TOKEN": "short"})
    assert "short" not in str(caught.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_hosts_serve_without_keys(host: str) -> None:
    assert Settings(host=host).check_exposure() is False


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.3", "shop-recs.internal"])
def test_other_hosts_need_keys_or_insecure(host: str) -> None:
    with pytest.raises(SettingsError, match=r"no API keys are set.*RECSVC_INSECURE=1"):
        Settings(host=host).check_exposure()
    with pytest.raises(SettingsError, match="RECSVC_INSECURE"):  # the admin token is no API key
        Settings(host=host, admin_token=OTHER).check_exposure()
    assert Settings(host=host, api_keys=f"web:recommend:{KEY}").check_exposure() is False
    assert Settings(host=host, insecure=True).check_exposure() is True  # warned about
    assert from_env({"RECSVC_HOST": host, "RECSVC_INSECURE": "1"}).insecure
    with pytest.raises(SettingsError, match="RECSVC_INSECURE='yes' is not 0 or 1"):
        from_env({"RECSVC_INSECURE": "yes"})


def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("RECSVC_"):
            monkeypatch.delenv(name)


def test_serve_on_every_interface_without_keys_refuses_before_redis_or_listening(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The refusal comes before anything else: no Redis URL is needed to see it,
    and nothing is bound. With RECSVC_INSECURE=1 the same command goes on, to the
    next check (no Redis URL), still without listening."""
    _clean_env(monkeypatch)
    argv = ["serve", "--host", "0.0.0.0", "--port", "9", "--data-dir", str(tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "RECSVC_HOST=0.0.0.0 is not a loopback address and no API keys are set" in err
    monkeypatch.setenv("RECSVC_INSECURE", "1")
    assert cli.main(argv) == 2
    assert "RECSVC_REDIS_URL is not set" in capsys.readouterr().err
    monkeypatch.delenv("RECSVC_INSECURE")
    monkeypatch.setenv("RECSVC_API_KEYS", f"web:recommend:{KEY}")
    assert cli.main(argv) == 2
    assert "RECSVC_REDIS_URL is not set" in capsys.readouterr().err


def test_the_demo_refuses_before_generating_anything(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _clean_env(monkeypatch)
    data = tmp_path / "data"
    assert cli.main(["demo", "--host", "::", "--data-dir", str(data)]) == 2
    assert "RECSVC_HOST=:: is not a loopback address" in capsys.readouterr().err
    assert not data.exists()
