"""`recsvc ab-report`: experiment results from the impression and outcome streams.

Per variant: users, exposures, clicks (exposures with a click on a shown item),
CTR, purchases, conversion (exposures with a purchase of a shown item),
revenue when prices are known, and the relative lift of CTR and conversion
against control with 95% intervals (delta method over users, the unit of
randomisation); plus a sample-ratio-mismatch check of the users per variant
against the weights recorded with their exposures. Forced (flagged) exposures
are left out.

Exposures are the impressions that carry experiments (``{ab}:impressions``),
and the entries of ``{ab}:exposures``, where exposures were logged before
impressions existed: those carry no weights, so their users are checked
against the experiments file's weights, and the report says how many were.
An outcome counts only for the exposure of its request id and of its user; an
outcome whose user is not the exposure's is counted as a mismatch and
reported, never as a click or a purchase.

With ``--from DIR`` the report also reads the files `recsvc export-impressions`
wrote there (``impressions-*`` and ``outcomes-*``, complete or still being
written: with ``--follow --trim`` what the open file holds is no longer in
Redis), so it outlives the streams' caps and ``--trim``. An impression counts
once wherever it is found (by request id, across files and the stream), an
outcome once per request, user, item, type and time; lines that are not an
impression or an outcome of the expected shape are skipped and counted.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from recsvc.ab.experiments import Experiments
from recsvc.ab.impressions import FIELD
from recsvc.ab.stats import ratio_lift, srm_pvalue
from recsvc.store import keys
from recsvc.store.client import RedisClient

SRM_ALARM = 0.001
READ_CHUNK = 10_000
# orjson writes an empty object so: an impression outside every experiment is
# skipped without decoding it (ids cannot hold a quote, so no id can look like it).
NO_EXPERIMENTS = b'"experiments":{}'


async def read_entries(
    client: RedisClient, key: str, since: float
) -> AsyncIterator[list[tuple[bytes, dict[bytes, bytes]]]]:
    """The entries (id, fields) of a stream from ``since`` (seconds since epoch),
    a chunk at a time."""
    start = f"{int(since * 1000)}-0"
    while True:
        batch: list[Any] = await client.xrange(key, min=start, max="+", count=READ_CHUNK) or []
        if batch:
            yield batch
            start = "(" + batch[-1][0].decode()
        if len(batch) < READ_CHUNK:
            return


async def read_stream(client: RedisClient, key: str, since: float) -> list[dict[str, Any]]:
    """Every entry of a stream from ``since`` (seconds since epoch), its fields decoded."""
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        async for chunk in read_entries(client, key, since)
        for _, fields in chunk
    ]


async def read_exposures(client: RedisClient, since: float) -> list[dict[str, Any]]:
    """The impressions from ``since`` that carry experiments, decoded; the others
    are dropped chunk by chunk (at full sampling most impressions are outside
    every experiment, and the stream may hold a million)."""
    return [
        e
        async for chunk in read_entries(client, keys.IMPRESSIONS, since)
        for e in exposures_of(chunk)
    ]


def exposures_of(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[dict[str, Any]]:
    """The impressions among ``entries`` that carry experiments, decoded."""
    out = []
    for _, fields in entries:
        raw = fields.get(FIELD.encode())
        if raw is not None and NO_EXPERIMENTS not in raw:
            out.append(orjson.loads(raw))
    return out


def legacy_exposure(fields: dict[str, str]) -> dict[str, Any]:
    """An ``{ab}:exposures`` entry (one field per attribute, JSON in some) in the
    impression's shape, without weights."""
    return {
        "request_id": fields["request_id"],
        "user_id": fields["user_id"],
        "ts": float(fields.get("ts", 0.0)),
        "experiments": orjson.loads(fields["experiments"]),
        "forced": orjson.loads(fields.get("forced", "[]")),
        "items": orjson.loads(fields["items"]),
        "weights": None,
    }


class ExportedFileError(ValueError):
    """An export directory or file that cannot be read (permissions, I/O)."""


@dataclass(slots=True)
class ExportedRead:
    """What ``read_exported`` took from a directory of exported files."""

    directory: str
    files: int = 0
    exposures: int = 0  # impressions with experiments, from ``since``
    outcomes: int = 0
    skipped: int = 0  # lines that are not JSON objects of the right shape
    duplicates: int = 0  # an impression or outcome already read from another file
    also_in_stream: int = 0  # counted once (set by ``report``)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _weights(value: Any) -> bool:
    """None, or {experiment: {"variants": {variant: weight}, ...}} with finite
    weights >= 0 of a positive sum (as recsvc.ab.experiments records them)."""
    if value is None:
        return True
    if not isinstance(value, dict):
        return False
    for w in value.values():
        variants = w.get("variants") if isinstance(w, dict) else None
        if not isinstance(variants, dict) or not variants:
            return False
        shares = list(variants.values())
        if not all(_number(x) and x >= 0 for x in shares) or sum(shares) <= 0:
            return False
    return True


# The fields of an impression the report uses (the rest, `sources` say, is not kept).
EXPOSURE_FIELDS = ("request_id", "user_id", "ts", "experiments", "forced", "items", "weights")


def _exposure(d: Any) -> dict[str, Any] | None:
    """The report's fields of an exported impression, or None when it is not one."""
    if not isinstance(d, dict):
        return None
    exps = d.get("experiments")
    if not (
        isinstance(d.get("request_id"), str)
        and isinstance(d.get("user_id"), str)
        and isinstance(exps, dict)
        and all(isinstance(v, str) for v in exps.values())
        and _strings(d.get("items"))
        and _strings(d.get("forced") or [])
        and _number(d.get("ts"))
        and _weights(d.get("weights"))
    ):
        return None
    return {k: d.get(k) for k in EXPOSURE_FIELDS}


OUTCOME_KEYS = ("request_id", "user_id", "item_id", "type", "ts")


def _is_outcome(d: Any) -> bool:
    return (
        isinstance(d, dict)
        and all(isinstance(d.get(k), str) for k in OUTCOME_KEYS[:4])
        and _number(d.get("ts"))
    )


# What `recsvc export-impressions` names its files: complete, or still being
# written (``.open``: with --follow --trim, what it holds is no longer in Redis).
EXPORTED = re.compile(r"^(impressions|outcomes)-(\d{8}T\d{6}Z)-(\d+)\.jsonl(\.open)?$")


def _exported_files(directory: Path, kind: str) -> list[Path]:
    """The regular files the exporter wrote for ``kind``, oldest first."""
    found = []
    for path in directory.iterdir():
        m = EXPORTED.match(path.name)
        if m and m.group(1) == kind and path.is_file():
            found.append(((m.group(2), int(m.group(3))), path))
    return [path for _, path in sorted(found)]


def _docs(path: Path, read: ExportedRead) -> Iterator[Any]:
    """The JSON values of a file's lines, one at a time. In a file still being
    written (``.open``) a last line without its newline is the exporter's
    unfinished write, left for the next run; in a complete file it is read (a
    file edited by hand may lack the final newline). A file deleted meanwhile
    (--max-mb) is skipped."""
    writing = path.name.endswith(".open")
    try:
        with path.open("rb") as f:
            read.files += 1
            for line in f:
                if (writing and not line.endswith(b"\n")) or not line.strip():
                    continue
                try:
                    yield orjson.loads(line)
                except orjson.JSONDecodeError:
                    read.skipped += 1
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ExportedFileError(f"{path}: {exc.strerror or exc}") from None


def read_exported(
    directory: Path, since: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], ExportedRead]:
    """The exposures (impressions with experiments) from ``since`` and every
    outcome in the exporter's files of ``directory``, complete or still being
    written. An impression in two files counts once. Outcomes are not filtered
    by time: an event's ``ts`` is the client's, and an outcome counts only
    through an exposure of the window anyway."""
    if not directory.is_dir():
        raise ExportedFileError(f"{directory}: no such directory")
    if not os.access(directory, os.R_OK | os.X_OK):
        raise ExportedFileError(f"{directory}: permission denied")
    read = ExportedRead(str(directory))
    exposures: list[dict[str, Any]] = []
    seen: set[str] = set()
    for path in _exported_files(directory, "impressions"):
        for d in _docs(path, read):
            e = _exposure(d)
            if e is None:
                read.skipped += 1
            elif e["request_id"] in seen:
                read.duplicates += 1
            elif e["experiments"] and e["ts"] >= since:
                seen.add(e["request_id"])
                exposures.append(e)
    outcomes: list[dict[str, Any]] = []
    seen_outcomes: set[tuple[str, str, str, str, int]] = set()
    for path in _exported_files(directory, "outcomes"):
        for d in _docs(path, read):
            if not _is_outcome(d):
                read.skipped += 1
                continue
            o = {k: d[k] for k in OUTCOME_KEYS}
            key = _outcome_key(o)
            if key in seen_outcomes:
                read.duplicates += 1
            else:
                seen_outcomes.add(key)
                outcomes.append(o)
    read.exposures, read.outcomes = len(exposures), len(outcomes)
    return exposures, outcomes, read


def _outcome_key(o: dict[str, Any]) -> tuple[str, str, str, str, int]:
    """An outcome's identity across a file and its stream (time to the ms)."""
    return (o["request_id"], o["user_id"], o["item_id"], o["type"], round(float(o["ts"]) * 1000))


@dataclass(frozen=True, slots=True)
class VariantStats:
    variant: str
    users: int
    exposures: int
    clicks: int
    purchases: int
    revenue: float | None

    @property
    def ctr(self) -> float:
        return self.clicks / self.exposures if self.exposures else 0.0

    @property
    def conversion(self) -> float:
        return self.purchases / self.exposures if self.exposures else 0.0


def build(
    exposures: list[dict[str, Any]],
    outcomes: list[dict[str, Any]],
    config: Experiments | None,
    experiment: str | None = None,
    prices: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The report as a JSON-able dict, one section per experiment.

    ``exposures``: impressions that carry experiments (decoded, in time order;
    ``weights`` None for legacy entries); ``config``: the experiments file, for
    the weights of legacy entries only."""
    done: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for o in outcomes:
        done[o["request_id"]].append(o)
    per_exp: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    forced_excluded: dict[str, int] = defaultdict(int)
    for e in exposures:
        forced = set(e.get("forced") or ())
        for name, variant in e["experiments"].items():
            if experiment is not None and name != experiment:
                continue
            if name in forced:
                forced_excluded[name] += 1
                continue
            per_exp[name][variant].append(e)
    sections = []
    for name in sorted(set(per_exp) | set(forced_excluded)):
        exp = next((x for x in config.experiments if x.name == name), None) if config else None
        order = [v.name for v in exp.variants] if exp else sorted(per_exp[name])
        order += sorted(set(per_exp[name]) - set(order))
        stats = []
        per_user: dict[str, dict[str, list[int]]] = {}
        mismatched = 0
        for variant in order:
            rows = per_exp[name].get(variant, [])
            clicks = purchases = 0
            revenue = 0.0
            users: dict[str, list[int]] = per_user.setdefault(variant, {})
            for e in rows:
                shown = set(e["items"])
                got: dict[str, set[str]] = defaultdict(set)
                for o in done.get(e["request_id"], ()):
                    if o["user_id"] == e["user_id"]:
                        got[o["type"]].add(o["item_id"])
                    else:  # another user's event under this answer's id: not its outcome
                        mismatched += 1
                clicked = bool(got["click"] & shown)
                bought = got["purchase"] & shown
                clicks += clicked
                purchases += bool(bought)
                revenue += sum((prices or {}).get(i, 0.0) for i in bought)
                counts = users.setdefault(e["user_id"], [0, 0, 0])
                counts[0] += 1
                counts[1] += clicked
                counts[2] += bool(bought)
            stats.append(
                VariantStats(
                    variant=variant,
                    users=len(users),
                    exposures=len(rows),
                    clicks=clicks,
                    purchases=purchases,
                    revenue=revenue if prices else None,
                )
            )
        control = next((s for s in stats if s.variant == "control"), stats[0] if stats else None)
        srm = _srm(name, order, per_exp[name], stats, exp)
        variants = []
        for s in stats:
            entry: dict[str, Any] = {
                "variant": s.variant,
                "users": s.users,
                "exposures": s.exposures,
                "clicks": s.clicks,
                "ctr": s.ctr,
                "purchases": s.purchases,
                "conversion": s.conversion,
                "revenue": s.revenue,
            }
            if control is not None and s is not control:
                mine = per_user[s.variant].values()
                base = per_user[control.variant].values()

                def column(rows: Any, k: int) -> list[float]:
                    return [float(c[k]) for c in rows]

                entry["ctr_lift"] = ratio_lift(
                    column(mine, 1), column(mine, 0), column(base, 1), column(base, 0)
                )
                entry["conversion_lift"] = ratio_lift(
                    column(mine, 2), column(mine, 0), column(base, 2), column(base, 0)
                )
            variants.append(entry)
        sections.append(
            {
                "experiment": name,
                "control": control.variant if control else None,
                "variants": variants,
                "forced_excluded": forced_excluded.get(name, 0),
                "outcomes_of_another_user": mismatched,
                **srm,
            }
        )
    return {"experiments": sections}


def _srm(
    name: str,
    order: list[str],
    rows: dict[str, list[dict[str, Any]]],
    stats: list[VariantStats],
    exp: Any,
) -> dict[str, Any]:
    """The sample-ratio check of one experiment: users per variant against the
    expected split, the sum over (variant, user) of the variant shares recorded
    with that user's first exposure there (the file's for a legacy exposure; equal
    shares when neither is known), so a change of weights during the window is
    accounted for user by user."""
    configured = {v.name: v.weight for v in exp.variants} if exp else None
    expected = dict.fromkeys(order, 0.0)
    sources: dict[str, int] = defaultdict(int)
    seen_weights: set[tuple[tuple[str, float], ...]] = set()
    for variant in order:
        first: dict[str, dict[str, Any]] = {}
        for e in rows.get(variant, ()):
            first.setdefault(e["user_id"], e)
        for e in first.values():
            recorded = (e.get("weights") or {}).get(name)
            if recorded is not None:
                weights, source = recorded["variants"], "recorded"
                seen_weights.add(tuple(sorted(weights.items())))
            elif configured is not None:
                weights, source = configured, "file"
            else:
                weights, source = {}, "equal"
            sources[source] += 1
            # A variant the weights do not name (renamed or removed since) counts
            # with their mean weight.
            mean = sum(weights.values()) / len(weights) if weights else 1.0
            shares = [weights.get(v, mean) for v in order]
            total = sum(shares)
            for v, w in zip(order, shares, strict=True):
                expected[v] += w / total
    p = srm_pvalue([s.users for s in stats], [max(expected[s.variant], 1e-12) for s in stats])
    return {
        "srm_pvalue": p,
        "srm_alarm": p < SRM_ALARM,
        # Users (per variant) whose expected share came from each source:
        # recorded with the exposure, the experiments file (legacy exposures),
        # or equal shares (legacy exposures and no file naming the experiment).
        "srm_weights": dict(sorted(sources.items())),
        "srm_weights_changed": len(seen_weights) > 1,
    }


def _lift(value: Any) -> str:
    if not value:
        return "-"
    lift, lo, hi = value
    return f"{lift:+.1%} [{lo:+.1%}, {hi:+.1%}]"


def format_report(report: dict[str, Any]) -> str:
    lines = []
    for sec in report["experiments"]:
        lines.append(f"experiment {sec['experiment']} (control: {sec['control']})")
        lines.append(
            f"  {'variant':<12}{'users':>8}{'exposures':>11}{'clicks':>8}{'CTR':>8}"
            f"{'purchases':>11}{'conv':>8}{'revenue':>11}  CTR lift [95% CI]"
            "            conversion lift [95% CI]"
        )
        for v in sec["variants"]:
            revenue = f"{v['revenue']:.2f}" if v["revenue"] is not None else "-"
            lines.append(
                f"  {v['variant']:<12}{v['users']:>8}{v['exposures']:>11}{v['clicks']:>8}"
                f"{v['ctr']:>8.2%}{v['purchases']:>11}{v['conversion']:>8.2%}{revenue:>11}  "
                f"{_lift(v.get('ctr_lift')):<30}{_lift(v.get('conversion_lift'))}"
            )
        lines.append(
            f"  sample ratio check: p = {sec['srm_pvalue']:.4g}"
            + ("  <-- SAMPLE RATIO MISMATCH: do not trust this result" if sec["srm_alarm"] else "")
        )
        weights = sec["srm_weights"]
        if set(weights) - {"recorded"}:
            lines.append(
                "  weights for the ratio check: "
                + ", ".join(f"{n} users' {WEIGHT_SOURCES[k]}" for k, n in weights.items())
            )
        if sec["srm_weights_changed"]:
            lines.append("  the weights changed during the window (each user counts with theirs)")
        if sec["forced_excluded"]:
            lines.append(f"  {sec['forced_excluded']} forced exposures left out")
        if sec["outcomes_of_another_user"]:
            lines.append(
                f"  {sec['outcomes_of_another_user']} outcomes posted by another user than "
                "the exposure's left out"
            )
    read = report.get("exported")
    if read is not None:
        lines.append(
            f"read from {read['directory']}: {read['files']} files, {read['exposures']} "
            f"exposures and {read['outcomes']} outcomes ({read['also_in_stream']} also still "
            f"in the streams and {read['duplicates']} repeated across files, counted once; "
            f"{read['skipped']} lines skipped)"
        )
    return "\n".join(lines) if lines else "no exposures"


WEIGHT_SOURCES = {
    "recorded": "recorded with the exposure",
    "file": "from the experiments file (exposures logged without weights)",
    "equal": "equal (exposures logged without weights, and no experiments file names it)",
}


async def report(
    client: RedisClient,
    config: Experiments | None,
    experiment: str | None,
    since: float,
    prices: dict[str, float] | None,
    exported: Path | None = None,
) -> dict[str, Any]:
    """``exported``: a directory of `recsvc export-impressions` files, read too."""
    legacy = [legacy_exposure(f) for f in await read_stream(client, keys.LEGACY_EXPOSURES, since)]
    streamed = await read_exposures(client, since)
    outcomes = await read_stream(client, keys.OUTCOMES, since)
    read = None
    if exported is not None:
        file_exposures, file_outcomes, read = read_exported(exported, since)
        in_stream = {e["request_id"] for e in streamed}
        outcome_keys = {_outcome_key(o) for o in outcomes}
        kept = [e for e in file_exposures if e["request_id"] not in in_stream]
        kept_outcomes = [o for o in file_outcomes if _outcome_key(o) not in outcome_keys]
        read.also_in_stream = (
            len(file_exposures) - len(kept) + len(file_outcomes) - len(kept_outcomes)
        )
        streamed = kept + streamed
        outcomes = kept_outcomes + outcomes
    exposures = legacy + streamed
    exposures.sort(key=lambda e: e["ts"])  # stable: each source is in time order already
    result = build(exposures, outcomes, config, experiment, prices)
    if read is not None:
        result["exported"] = asdict(read)
    return result
