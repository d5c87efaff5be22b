"""Settings: environment parsing, validation naming the variable, the documented table."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recsvc.settings import SETTINGS_TABLE, Settings, SettingsError, from_env, markdown_table
from recsvc.store.redisurl import cluster_kwargs, is_cluster_url

# The settings reference: holds the generated table verbatim.
CONFIGURATION_DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_defaults_without_environment() -> None:
    s = from_env({})
    assert s == Settings()
    assert s.models_path == Path("recsvc-data/models")


def test_environment_values_are_typed() -> None:
    s = from_env(
        {
            "RECSVC_PORT": "9000",
            "RECSVC_REDIS_TIMEOUT_MS": "12.5",
            "RECSVC_MODEL_DIR": "/m",
            "RECSVC_REDIS_URL": "redis://h:1/0",
        }
    )
    assert (s.port, s.redis_timeout_ms, s.model_dir, s.redis_url) == (
        9000,
        12.5,
        Path("/m"),
        "redis://h:1/0",
    )


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"RECSVC_PORT": "eighty"}, "RECSVC_PORT"),
        ({"RECSVC_PORT": "70000"}, "RECSVC_PORT"),
        ({"RECSVC_CANDIDATE_CAP": "0"}, "RECSVC_CANDIDATE_CAP"),
        ({"RECSVC_REDIS_URL": "http://x"}, "RECSVC_REDIS_URL"),
        ({"RECSVC_LOG_LEVEL": "LOUD"}, "RECSVC_LOG_LEVEL"),
    ],
)
def test_bad_value_fails_naming_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(SettingsError, match=name):
        from_env(env)


def test_cli_overrides_keep_validation() -> None:
    assert Settings().replace(port=1234, host=None).port == 1234
    with pytest.raises(SettingsError, match="RECSVC_DEFAULT_N"):
        Settings().replace(default_n=1000)


def test_every_setting_is_in_the_table_and_the_docs() -> None:
    fields = [f.name for f in dataclasses.fields(Settings)]
    assert [name for name, _ in SETTINGS_TABLE] == fields
    assert markdown_table() in CONFIGURATION_DOC.read_text(), (
        "docs/configuration.md: replace its table with the output of `python -m recsvc.settings`"
    )


def test_cluster_urls_are_parsed_and_validated() -> None:
    assert is_cluster_url("redis+cluster://h:1") and is_cluster_url("REDISS+CLUSTER://h:1")
    assert not is_cluster_url("redis://h:1")
    kw = cluster_kwargs("rediss+cluster://app:p%40ss@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002")
    nodes = [(n.host, n.port) for n in kw["startup_nodes"]]
    assert nodes == [("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002)]
    assert (kw["username"], kw["password"], kw["ssl"]) == ("app", "p@ss", True)
    assert cluster_kwargs("redis+cluster://h")["startup_nodes"][0].port == 6379
    for bad in ("redis+cluster://h:1/2", "redis+cluster://h:1?timeout=1"):
        with pytest.raises(ValueError, match="no database"):
            cluster_kwargs(bad)
    for bad in ("redis+cluster://", "redis+cluster://h:1,:2"):
        with pytest.raises(ValueError, match="needs host:port"):
            cluster_kwargs(bad)
    with pytest.raises(ValueError, match="invalid literal"):
        cluster_kwargs("redis+cluster://h:port")
    Settings(redis_url="redis+cluster://h:1").validate()
    with pytest.raises(SettingsError, match="RECSVC_REDIS_URL"):  # a message, not a traceback
        Settings(redis_url="redis+cluster://h:1/3").validate()
    with pytest.raises(SettingsError, match="RECSVC_REDIS_URL"):
        Settings(redis_url="cluster://h:1").validate()


def test_cors_origins_must_be_origins() -> None:
    assert Settings(cors_origins="https://a.example, http://localhost:3000").cors_origin_list == [
        "https://a.example",
        "http://localhost:3000",
    ]
    Settings(cors_origins="*").validate()
    for bad in ("https://a.example/path", "a.example", "https://a.example,ftp://b"):
        with pytest.raises(SettingsError, match="RECSVC_CORS_ORIGINS"):
            Settings(cors_origins=bad).validate()


def test_candidate_quotas_override_the_defaults() -> None:
    s = from_env({"RECSVC_CANDIDATE_QUOTAS": " collaborative=120, popular=0 ,per_category=10"})
    c = s.candidate_config
    assert (c.collaborative, c.popular, c.per_category, c.related) == (120, 0, 10, 80)
    assert c.cap == s.candidate_cap


@pytest.mark.parametrize(
    "value",
    ["nosuch=3", "popular=-1", "popular=x", "popular=5,popular=7", "popular=１０", "popular"],
)
def test_bad_candidate_quotas_name_the_variable(value: str) -> None:
    with pytest.raises(SettingsError, match="RECSVC_CANDIDATE_QUOTAS"):
        from_env({"RECSVC_CANDIDATE_QUOTAS": value})


@pytest.mark.parametrize("value", ["yes", "AUTO", ""])
def test_exclude_seen_is_auto_always_or_never(value: str) -> None:
    with pytest.raises(SettingsError, match="RECSVC_EXCLUDE_SEEN"):
        from_env({"RECSVC_EXCLUDE_SEEN": value})


CPU_CGROUP = Path("/sys/fs/cgroup/cpu")


@pytest.mark.skipif(
    not os.access(CPU_CGROUP, os.W_OK) or len(os.sched_getaffinity(0)) < 2,
    reason="needs a writable cgroup v1 cpu controller (root) and two cores",
)
def test_one_worker_per_core_counts_a_cpu_quota(tmp_path: Path) -> None:
    """workers=0 means the cores this process may use: all it may run on, but one
    under a quota of one CPU (a container on a larger host)."""
    code = "from recsvc.settings import Settings; print(Settings().worker_count)"
    free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert int(free.stdout) == len(os.sched_getaffinity(0))
    group = CPU_CGROUP / f"recsvc-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")
        wrapped = f"import os; open('{group}/cgroup.procs', 'w').write(str(os.getpid())); " + code
        limited = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True)
        assert int(limited.stdout) == 1, limited.stderr
    finally:
        group.rmdir()
