"""Roll-out records, the canary slice, the registry that follows them, and the
guardrail statistics (real redis-server, real LightGBM models)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from redis.asyncio import Redis

from recsvc.ab.experiments import Experiment, Variant
from recsvc.ab.guardrails import ArmStats, evaluate
from recsvc.ab.rollout import (
    CANARY,
    PROMOTED,
    RUNNING,
    STABLE,
    RolloutError,
    RolloutStore,
    new_rollout,
    parse_share,
    plan_steps,
)
from recsvc.cli import rollouts
from recsvc.ranking import models
from recsvc.ranking.models import ModelRegistry

USERS = [f"u{k}" for k in range(20_000)]


def test_the_canary_slice_is_stable_nested_and_its_own() -> None:
    r5 = new_rollout("ranker", "v1", "v2", 0.05, (0.25, 0.5), 100)
    in5 = {u for u in USERS if r5.in_canary(u)}
    assert abs(len(in5) / len(USERS) - 0.05) < 0.006
    # Stable: the same record read again (another worker) puts the same users in.
    again = type(r5).from_json(r5.to_json())
    assert {u for u in USERS if again.in_canary(u)} == in5
    # Nested: a step up keeps every canary user on the canary.
    from dataclasses import replace

    in25 = {u for u in USERS if replace(r5, share=0.25).in_canary(u)}
    assert in5 < in25 and abs(len(in25) / len(USERS) - 0.25) < 0.012
    # Its own salt: the canary users split like everyone in an experiment on the
    # same name, and another roll-out picks other users.
    exp = Experiment("ranker", "ranker", True, 1.0, False, (Variant("a", 1), Variant("b", 1)))
    share_a = sum(exp.variant_for(u).name == "a" for u in in5) / len(in5)
    assert abs(share_a - 0.5) < 0.06
    other = new_rollout("ranker", "v1", "v2", 0.05, (0.25, 0.5), 100)
    overlap = len(in5 & {u for u in USERS if other.in_canary(u)}) / len(in5)
    assert overlap < 0.15  # ~5% by chance
    # Not running: nobody is on the canary.
    assert not any(replace(r5, status=PROMOTED).in_canary(u) for u in list(in5)[:50])


def test_shares_and_steps() -> None:
    assert parse_share("5%") == 0.05 and parse_share("0.25") == 0.25
    for bad in ("0", "150%", "x", "-5%"):
        with pytest.raises(RolloutError):
            parse_share(bad)
    assert plan_steps(0.05, (0.25, 0.5, 1.0)) == (0.05, 0.25, 0.5, 1.0)
    assert plan_steps(0.3, (0.25, 0.5)) == (0.3, 0.5, 1.0)


@pytest.mark.asyncio
async def test_records_are_compare_and_set(aredis: Redis) -> None:
    await aredis.delete("{rollout}:state")
    store = RolloutStore(aredis)
    first = new_rollout("ranker", "v1", "v2", 0.05, (0.25,), 10)
    stored = await store.put(first, 0)
    assert stored is not None and stored.rev == 1
    assert await store.put(first, 0) is None  # someone wrote since: refused
    from dataclasses import replace

    moved = await store.put(replace(stored, share=0.25), stored.rev)
    assert moved is not None and moved.rev == 2
    got = await store.get("ranker")
    assert got is not None and got.share == 0.25 and got.status == RUNNING
    assert list(await store.all()) == ["ranker"]


@pytest.mark.asyncio
async def test_the_registry_follows_the_records(
    aredis: Redis, two_versions: tuple[Path, str, str]
) -> None:
    root, old, new = two_versions
    await aredis.delete("{rollout}:state")
    store = RolloutStore(aredis)
    registry = ModelRegistry(root, "ranker")
    registry.load_now()
    assert registry.current is not None and registry.current.version == new  # newest

    # Promote the older one for everyone: pinned, and the poller leaves it.
    r = await rollouts.promote(store, root, "ranker", old, None, None, 100)
    assert r.status == PROMOTED and r.stable == old
    assert await registry.follow(await store.all()) == {}
    assert registry.current is not None and registry.current.version == old
    (outcome,) = await registry.reload()
    assert outcome.status == "pinned" and registry.current.version == old

    # A canary of the newer one on 10%: users in the slice get it, tagged.
    r = await rollouts.promote(store, root, "ranker", new, "10%", "25%,50%", 100)
    assert r.running and r.stable == old and r.canary == new
    await registry.follow(await store.all())
    picks = [registry.pick(None, u) for u in USERS[:2000]]
    on_canary = [p for p in picks if p.arm == CANARY]
    assert 0.07 < len(on_canary) / len(picks) < 0.13
    assert all(p.model is not None and p.model.version == new for p in on_canary)
    assert all(p.model is not None and p.model.version == old for p in picks if p.arm == STABLE)
    with pytest.raises(RolloutError, match="running"):
        await rollouts.promote(store, root, "ranker", new, "5%", None, 100)

    # Aborted: everyone back on the stable version, no arm.
    await rollouts.abort(store, "ranker")
    await registry.follow(await store.all())
    assert {registry.pick(None, u).arm for u in USERS[:500]} == {None}
    assert not registry.canaries

    # Unpinned: the newest version serves again at the next poll.
    await rollouts.unpin(store, "ranker")
    await registry.follow(await store.all())
    (outcome,) = await registry.reload()
    assert outcome.status == "loaded" and registry.current.version == new


@pytest.mark.asyncio
async def test_a_canary_that_cannot_load_is_reported(
    aredis: Redis, two_versions: tuple[Path, str, str]
) -> None:
    root, old, new = two_versions
    await aredis.delete("{rollout}:state")
    store = RolloutStore(aredis)
    registry = ModelRegistry(root, "ranker")
    registry.load_now()
    await rollouts.promote(store, root, "ranker", new, "5%", None, 100, stable=old)
    (root / "ranker" / new / models.MODEL_FILE).write_text("not a model\n")
    failed = await registry.follow(await store.all())
    assert set(failed) == {"ranker"} and "unreadable" in failed["ranker"]
    assert {registry.pick(None, u).arm for u in USERS[:500]} <= {STABLE, None}
    assert all(registry.pick(None, u).model.version == old for u in USERS[:200])  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_only_names_this_worker_serves_can_be_unfollowed(
    aredis: Redis, two_versions: tuple[Path, str, str]
) -> None:
    """Records of names with no version here (another service on the same Redis)
    are not this worker's to follow; a pinned version that will not load is."""
    root, old, new = two_versions
    await aredis.delete("{rollout}:state")
    store = RolloutStore(aredis)
    assert await store.put(new_rollout("elsewhere", "v1", None, 1.0, (), 100), 0) is not None
    await rollouts.promote(store, root, "ranker", old, None, None, 100)
    registry = ModelRegistry(root, "ranker")
    registry.load_now()
    await registry.follow(await store.all())
    assert registry.unfollowed() == {}
    (root / "ranker" / new / models.MODEL_FILE).write_text("not a model\n")
    r = await store.get("ranker")
    assert r is not None
    assert await store.put(replace(r, stable=new), r.rev) is not None
    await registry.follow(await store.all())
    assert set(registry.unfollowed()) == {"ranker"}
    assert f"record's stable {new}, serving {old}" in registry.unfollowed()["ranker"]


def _marked(root: Path) -> set[str]:
    return {p.name for p in models.versions(root, "ranker") if (p / models.PINNED_FILE).exists()}


@pytest.mark.asyncio
async def test_workers_keep_the_pinned_markers_in_step_with_the_records(
    aredis: Redis, two_versions: tuple[Path, str, str]
) -> None:
    """The controller promotes and rolls back in Redis only, and instances may
    have model directories of their own: every worker marks on its disk what
    the records name, so training's pruning spares it and `models list` shows it."""
    root, old, new = two_versions
    await aredis.delete("{rollout}:state")
    store = RolloutStore(aredis)
    registry = ModelRegistry(root, "ranker")
    registry.load_now()
    assert await store.put(new_rollout("ranker", old, None, 1.0, (), 100), 0) is not None
    await registry.follow(await store.all())
    assert _marked(root) == {old}
    r = await store.get("ranker")  # as the controller's promotion writes it
    assert r is not None and await store.put(replace(r, stable=new), r.rev) is not None
    await registry.follow(await store.all())
    assert _marked(root) == {new}
    assert await store.delete("ranker")  # `models unpin` run on another host
    await registry.follow(await store.all())
    assert _marked(root) == set()
    # Markers found without a record this worker saw are kept: the record may be
    # one a `promote` is writing right now (over-pinning keeps a version, the
    # other way the next training deletes it). `models unpin` clears its disk's.
    models.pin(root, "ranker", {old})
    fresh = ModelRegistry(root, "ranker")
    fresh.load_now()
    await fresh.follow(await store.all())
    assert _marked(root) == {old}


@pytest.mark.asyncio
async def test_promote_refuses_what_cannot_serve(
    aredis: Redis, two_versions: tuple[Path, str, str]
) -> None:
    root, old, new = two_versions
    await aredis.delete("{rollout}:state")
    store = RolloutStore(aredis)
    with pytest.raises(RolloutError, match="no version 'nope'"):
        await rollouts.promote(store, root, "ranker", "nope", "5%", None, 100)
    with pytest.raises(RolloutError, match="older than"):
        await rollouts.promote(store, root, "ranker", old, "5%", None, 100)
    with pytest.raises(RolloutError, match="no canary"):
        await rollouts.abort(store, "ranker")
    r = await rollouts.promote(store, root, "ranker", new, "5%", None, 100)
    assert r.stable == old  # the newest older version, without a record or --stable


def _listed(root: Path) -> dict[str, str]:
    """`recsvc models list`: version -> its row."""
    done = subprocess.run(
        [sys.executable, "-m", "recsvc", "models", "list", "--model-dir", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("RECSVC_")},
        check=True,
    )
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("ranker ")]
    return {row[1]: " ".join(row) for row in rows}


def test_models_list_calls_no_version_of_a_pinned_name_serving(
    two_versions: tuple[Path, str, str],
) -> None:
    """Without a record the newest version serves; once a roll-out pins the name,
    the record decides, and the list says to look there."""
    root, old, new = two_versions
    rows = _listed(root)
    assert rows[new].endswith(" serving") and rows[old].endswith(" ok"), rows
    models.pin(root, "ranker", {old})  # as `recsvc models promote` marks a stable `old`
    rows = _listed(root)
    assert "serving" not in rows[new] and rows[new].endswith(" ok"), rows
    assert rows[old].endswith("pinned (see: recsvc models status)"), rows


def _arm(users: int, impressions: int, ctr: float, seed: int) -> ArmStats:
    rng = random.Random(seed)
    arm = ArmStats()
    for k in range(impressions):
        user = f"u{seed}-{k % users}"
        arm.answer(user, "model", None, 5.0 + rng.random())
        arm.matured(user, rng.random() < ctr, rng.random() < ctr / 10)
    return arm


def test_guardrails_hold_for_equals_and_stop_a_worse_canary() -> None:
    control = _arm(380, 7600, 0.30, 1)
    equal = _arm(20, 400, 0.30, 2)
    worse = _arm(20, 400, 0.15, 3)
    held = evaluate(equal, control, 0.05, final=True)
    assert all(c.ok is not False for c in held), held
    failed = [c for c in evaluate(worse, control, 0.05, final=False) if c.ok is False]
    assert [c.name for c in failed] == ["ctr"]
    assert "lift" in failed[0].detail


def test_srm_uses_the_share_served() -> None:
    control = _arm(900, 9000, 0.3, 4)
    canary = _arm(100, 1000, 0.3, 5)  # 10% of the users
    checks = {c.name: c for c in evaluate(canary, control, 0.10, final=True)}
    assert checks["srm"].ok is True
    checks = {c.name: c for c in evaluate(canary, control, 0.05, final=True)}
    assert checks["srm"].ok is False  # twice the users the share allows


def test_the_running_moments_give_the_reports_interval() -> None:
    """The controller's O(1) delta method equals ab-report's per-user one."""
    from recsvc.ab.guardrails import ratio_lift as from_moments
    from recsvc.ab.stats import ratio_lift as from_users

    a, b = _arm(30, 700, 0.2, 8), _arm(200, 5000, 0.3, 9)
    rows_a, rows_b = list(a.users.values()), list(b.users.values())
    for k, moments in ((1, "clicks"), (2, "purchases")):
        want = from_users(
            [float(r[k]) for r in rows_a],
            [float(r[0]) for r in rows_a],
            [float(r[k]) for r in rows_b],
            [float(r[0]) for r in rows_b],
            z=3.0,
        )
        got = from_moments(getattr(a, moments), getattr(b, moments), 3.0)
        assert want is not None and got is not None
        assert got == pytest.approx(want, rel=1e-9)
