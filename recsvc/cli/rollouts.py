"""`recsvc models promote | status | abort | unpin`: roll-outs in Redis (recsvc.ab.rollout).

The CLI writes the record; every worker follows it within RECSVC_ROLLOUT_POLL_SECS,
and the canary controller in the service steps the canary up or rolls it back.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from recsvc.ab.rollout import (
    DEFAULT_STEPS,
    ROLLED_BACK,
    Rollout,
    RolloutError,
    RolloutStore,
    new_rollout,
    parse_share,
)
from recsvc.errors import ModelRejected
from recsvc.ranking import models


def _check_version(model_dir: Path, name: str, version: str) -> None:
    """RolloutError unless the version exists and loads with this code."""
    path = model_dir / name / version
    if not (path / models.META_FILE).is_file():
        have = [p.name for p in models.versions(model_dir, name)]
        raise RolloutError(
            f"no version {version!r} of model {name!r} under {model_dir} "
            f"(have: {', '.join(have) or 'none'})"
        )
    try:
        models.load(path)
    except ModelRejected as exc:
        raise RolloutError(f"version {version} cannot serve: {exc}") from None


def _default_stable(model_dir: Path, name: str, canary: str) -> str:
    """Without a record: the newest version older than the canary (what served
    before the canary was trained)."""
    older = [p.name for p in models.versions(model_dir, name) if p.name < canary]
    if not older:
        raise RolloutError(
            f"no version of {name!r} older than {canary} to compare the canary with; "
            "pass --stable VERSION"
        )
    return older[0]


async def promote(
    store: RolloutStore,
    model_dir: Path,
    name: str,
    version: str,
    canary: str | None,
    steps: str | None,
    min_exposures: int,
    stable: str | None = None,
) -> Rollout:
    """Start a canary of ``version`` (``canary``: its first share, e.g. '5%'), or
    without ``canary`` make ``version`` the stable version for everyone now."""
    _check_version(model_dir, name, version)
    if min_exposures < 1:
        raise RolloutError("--min-exposures must be at least 1")
    plan = DEFAULT_STEPS if steps is None else tuple(parse_share(s) for s in steps.split(","))
    for _ in range(5):
        current = await store.get(name)
        if current is not None and current.running:
            raise RolloutError(
                f"a canary of {name} {current.canary} is running at {current.share:.0%}: "
                f"`recsvc models abort {name}` first"
            )
        if canary is None:
            record = new_rollout(name, version, None, 1.0, plan, min_exposures)
        else:
            base = stable or (current.stable if current else None)
            base = base or _default_stable(model_dir, name, version)
            _check_version(model_dir, name, base)
            if base == version:
                raise RolloutError(f"{version} is already the stable version of {name}")
            share = parse_share(canary)
            record = new_rollout(name, base, version, share, plan, min_exposures)
        if current is not None:  # keep what happened before in the history
            record = replace(record, history=(*current.history, *record.history)[-50:])
        stored = await store.put(record, current.rev if current else 0)
        if stored is not None:
            # Training prunes old versions: never the ones the record names, or
            # a restarted worker would have nothing pinned to serve.
            models.pin(model_dir, name, {v for v in (stored.stable, stored.canary) if v})
            return stored
    raise RolloutError("the roll-out record kept changing; try again")


async def abort(store: RolloutStore, name: str) -> Rollout:
    """Roll a running canary back by hand: everyone gets the stable version."""
    for _ in range(5):
        r = await store.get(name)
        if r is None or not r.running:
            raise RolloutError(f"no canary of {name} is running")
        new = replace(r, status=ROLLED_BACK, share=0.0, reason="aborted by the operator")
        stored = await store.put(new.noted("rolled_back", at_share=r.share, by="operator"), r.rev)
        if stored is not None:
            return stored
    raise RolloutError("the roll-out record kept changing; try again")


async def unpin(store: RolloutStore, name: str, model_dir: Path | None = None) -> None:
    """Forget the record: the newest version on disk serves again (and old
    versions may be pruned again)."""
    r = await store.get(name)
    if r is not None and r.running:
        raise RolloutError(f"a canary of {name} is running: `recsvc models abort {name}` first")
    if not await store.delete(name):
        raise RolloutError(f"{name} has no roll-out record")
    if model_dir is not None:
        models.pin(model_dir, name, set())


def _ago(ts: float) -> str:
    secs = max(0.0, time.time() - ts)
    return f"{secs:.0f}s ago" if secs < 120 else f"{secs / 60:.0f}min ago"


def format_status(records: dict[str, Rollout]) -> str:
    if not records:
        return "no roll-outs: every model name serves its newest version"
    lines: list[str] = []
    for name, r in sorted(records.items()):
        if r.running:
            head = (
                f"{name}: canary {r.canary} on {r.share:.0%} of users (steps "
                + " -> ".join(f"{s:.0%}" for s in r.steps)
                + f"), stable {r.stable}; step started {_ago(r.step_started_at)}, "
                f"{r.min_exposures} canary impressions per step"
            )
        elif r.status == ROLLED_BACK:
            head = f"{name}: {r.stable} serves; canary {r.canary} rolled back: {r.reason}"
        else:
            head = f"{name}: {r.stable} serves everyone (pinned; {r.reason or 'promoted'})"
        lines.append(head)
        checks: dict[str, Any] = r.checks or {}
        for arm in ("canary", "other"):
            s = checks.get(arm)
            if s:
                lines.append(
                    f"  {arm:6}  answers {s['answers']}, users {s['users']}, impressions "
                    f"{s['impressions']}, ctr {_pct(s['ctr'])}, conversion "
                    f"{_pct(s['conversion'])}, fallbacks {_pct(s['fallback_rate'])}, "
                    f"p99 {_ms(s['p99_ms'])}"
                )
        for c in checks.get("guardrails", []):
            mark = {True: "ok  ", False: "FAIL", None: "wait"}[c["ok"]]
            lines.append(f"  {mark} {c['name']}: {c['detail']}")
        for h in r.history[-5:]:
            extra = {k: v for k, v in h.items() if k not in ("at", "event")}
            lines.append(f"  {_ago(h['at'])}: {h['event']} {extra}")
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2%}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"
