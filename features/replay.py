"""Offline replay: the pure state as the service would have held it, event by event."""

from __future__ import annotations

from collections.abc import Callable

from features.events import COVISIT_BUCKET_SECS
from features.logs import Catalogue, EventLog
from features.state import COL_PRICE, ItemTable, UserState, apply_user_event, covisit_bucket


class Replay:
    """User states and the item table, advanced one event at a time in log order."""

    def __init__(self, catalogue: Catalogue | None = None) -> None:
        self.items = ItemTable()
        self.users: dict[str, UserState] = {}
        if catalogue is not None:
            for item, cat, price in zip(
                catalogue.item_ids, catalogue.categories, catalogue.prices.tolist(), strict=True
            ):
                self.items.upsert_item(item, cat, price)

    def item_meta(self, item_index: int) -> tuple[str, float]:
        """(category, price) of an item as the event update needs them."""
        row = self.items.raw[item_index]
        c = int(row[3])
        return (self.items.categories[c] if c >= 0 else "", float(row[COL_PRICE]))

    def apply(self, ts: float, user_id: str, item_id: str, event_type: int) -> None:
        i = self.items.ensure_item(item_id)
        category, price = self.item_meta(i)
        state = self.users.get(user_id)
        if state is None:
            state = self.users[user_id] = UserState()
        partners = apply_user_event(state, event_type, ts, item_id, category, price)
        self.items.apply_event(i, event_type, ts)
        if partners:
            # As the store: partner rows (created bare when new), in row order.
            others = sorted(self.items.ensure_item(p) for p in partners)
            self.items.add_pairs(i, others, covisit_bucket(ts) * COVISIT_BUCKET_SECS)

    def run(
        self,
        log: EventLog,
        before: Callable[[int, float, str, str, int], None] | None = None,
        progress: Callable[[int], None] | None = None,
        after: Callable[[int], None] | None = None,
    ) -> None:
        """Apply every event; ``before(k, ...)`` sees the state just before event k,
        ``after(k)`` just after it."""
        for k, (ts, user_id, item_id, event_type) in enumerate(log.rows()):
            if before is not None:
                before(k, ts, user_id, item_id, event_type)
            self.apply(ts, user_id, item_id, event_type)
            if after is not None:
                after(k)
            if progress is not None and k % 10_000 == 9_999:
                progress(10_000)
