"""Event ingestion (no HTTP here): validate times, attach item attributes, apply once."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from features.events import EVENT_BY_NAME, MAX_FUTURE_SECS
from features.state import COL_PRICE
from recsvc.ab.impressions import ImpressionLog
from recsvc.errors import InvalidRequest, StoreUnavailable
from recsvc.ops import metrics
from recsvc.service.itemcache import ItemCache
from recsvc.store.feature_store import UNKNOWN_ITEM, EventWrite, FeatureStore, ItemWriteFailed

log = logging.getLogger(__name__)


def _public(reason: str) -> str:
    """What a client is told about a shard that refused a write: which shard and
    whether to retry, never Redis's own error text (that goes to the log)."""
    if reason.endswith(" is full"):
        return reason
    return reason.split(":", 1)[0] + "; retry later"


class EventIn(Protocol):
    """An event as the API decoded it (``recsvc.web.api.EventIn``): what ingestion
    reads, so this layer does not depend on the web layer."""

    @property
    def event_id(self) -> str: ...
    @property
    def user_id(self) -> str: ...
    @property
    def item_id(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def ts(self) -> float | None: ...
    @property
    def request_id(self) -> str | None: ...


@dataclass(slots=True)
class IngestResult:
    accepted: int = 0
    duplicates: int = 0
    # Events that will never apply as sent: index, reason (invalid or
    # unknown_item), error and field.
    rejected: list[dict[str, Any]] = field(default_factory=list)
    # Valid events the store could not apply now (retry them): index and reason.
    failed: list[dict[str, Any]] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "failed": self.failed,
        }


class Ingestor:
    """Applies validated events through the store's atomic, deduplicating scripts."""

    def __init__(
        self, store: FeatureStore, items: ItemCache, impressions: ImpressionLog | None = None
    ) -> None:
        self.store = store
        self.items = items
        self.impressions = impressions

    def _write(self, e: EventIn, now: float) -> EventWrite:
        ts = now if e.ts is None else e.ts
        if ts > now + MAX_FUTURE_SECS:
            raise InvalidRequest(
                f"ts {ts} is more than {MAX_FUTURE_SECS:.0f} s in the future", field="ts"
            )
        # Tolerated clock skew must not put state in the future; the window is
        # checked on the time that is applied.
        ts = min(ts, now)
        if ts < now - self.store.dedupe_ttl:
            # Older than the dedupe window: a retry could no longer be recognised.
            raise InvalidRequest(
                f"ts {ts} is older than the {self.store.dedupe_ttl} s deduplication window "
                "(load history with `recsvc import`)",
                field="ts",
            )
        # Item attributes come from the item table, never from the client, so the
        # online update sees what the offline replay sees (see EventWrite).
        table = self.items.view.table
        row = table.index.get(e.item_id)
        category, price = "", 0.0
        if row is not None:
            category = table.category_name(row)
            price = float(table.raw[row, COL_PRICE])
        return EventWrite(
            e.user_id, e.item_id, EVENT_BY_NAME[e.type], ts, e.event_id, category, price
        )

    async def ingest(self, events: Sequence[EventIn | InvalidRequest]) -> IngestResult:
        """Apply the valid events in one round trip; StoreUnavailable if Redis fails."""
        now = time.time()
        result = IngestResult()
        writes: list[EventWrite] = []
        sources: list[EventIn] = []
        positions: list[int] = []
        for k, e in enumerate(events):
            try:
                if isinstance(e, InvalidRequest):
                    raise e
                writes.append(self._write(e, now))
                sources.append(e)
                positions.append(k)
            except InvalidRequest as err:
                result.rejected.append(
                    {"index": k, "reason": "invalid", "error": err.message, "field": err.field}
                )
        if result.rejected:
            metrics.EVENTS.labels("rejected").inc(len(result.rejected))
        if writes:
            outcome: list[int | None]
            try:
                outcome = list(await self.store.apply_events(writes))
            except ItemWriteFailed as exc:
                outcome = exc.results
                for j, reason in sorted(exc.failed.items()):
                    result.failed.append({"index": positions[j], "error": _public(reason)})
                log.warning(
                    "%d event(s) not applied: %s", len(exc.failed), sorted(set(exc.failed.values()))
                )
                metrics.EVENTS.labels("failed").inc(len(exc.failed))
            except StoreUnavailable:
                metrics.EVENTS.labels("failed").inc(len(writes))
                raise
            unknown = 0
            for j, a in enumerate(outcome):
                if a == UNKNOWN_ITEM:  # the policy refused to create it; nothing written
                    unknown += 1
                    result.rejected.append(
                        {
                            "index": positions[j],
                            "reason": "unknown_item",
                            "error": f"item {writes[j].item_id!r} is not in the catalogue",
                            "field": "item_id",
                        }
                    )
            if unknown:
                result.rejected.sort(key=lambda r: r["index"])
                metrics.EVENTS.labels("unknown_item").inc(unknown)
            done = [
                (w, e, a)
                for w, e, a in zip(writes, sources, outcome, strict=True)
                if a is not None and a != UNKNOWN_ITEM
            ]
            result.accepted = sum(a for _, _, a in done)
            result.duplicates = len(done) - result.accepted
            metrics.EVENTS.labels("accepted").inc(result.accepted)
            metrics.EVENTS.labels("duplicate").inc(result.duplicates)
            if self.impressions is not None:
                # Attribute events to the recommendation they came from, duplicates
                # included: a retry after a write that timed out half way is a
                # duplicate whose first attempt logged nothing. The report counts
                # sets per request, so a repeat never counts twice.
                for w, e, _ in done:
                    if e.request_id:
                        self.impressions.outcome(e.request_id, w.user_id, w.item_id, e.type, w.ts)
        return result
