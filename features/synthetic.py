"""Synthetic shop: a catalogue, users with latent tastes, and their behaviour log.

Users prefer a few categories and a price level; they view items drawn from
their categories by popularity and price fit, and go on to click, add to cart
and purchase more often when the item fits. So a model that sees category
affinity and price fit can beat ranking by popularity, as on a real shop.
Deterministic for a seed; ``end_ts`` anchors the log in time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features.events import EventType
from features.logs import Catalogue, EventLog


@dataclass(frozen=True, slots=True)
class SyntheticConfig:
    """Sizes and shape of the synthetic shop (demo defaults)."""

    n_users: int = 20_000
    n_items: int = 5_000
    n_events: int = 500_000
    n_categories: int = 40
    days: float = 30.0
    seed: int = 7
    favourite_categories: int = 3
    # Share of views outside the user's own tastes (browsing the front page).
    explore: float = 0.15
    # Items a user considers per view before picking by price fit.
    consideration: int = 8


@dataclass(frozen=True, slots=True)
class SyntheticData:
    catalogue: Catalogue
    events: EventLog


def _pick_rows(cum: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One column index per row of a row-wise cumulative distribution."""
    r = rng.random(cum.shape[0]) * cum[:, -1]
    return np.asarray((cum < r[:, None]).sum(axis=1))


def generate(config: SyntheticConfig, end_ts: float) -> SyntheticData:
    """Build the catalogue and a time-ordered log of about ``n_events`` events."""
    rng = np.random.default_rng(config.seed)
    n_c, n_i, n_u = config.n_categories, config.n_items, config.n_users

    # Catalogue: uneven category sizes, per-category price level, skewed popularity.
    cat_share = rng.dirichlet(np.full(n_c, 2.0))
    item_cat = np.sort(rng.choice(n_c, size=n_i, p=cat_share))
    cat_log_price = rng.normal(3.5, 0.8, size=n_c)
    item_log_price = cat_log_price[item_cat] + rng.normal(0.0, 0.5, size=n_i)
    item_pop = rng.lognormal(0.0, 1.2, size=n_i)
    cat_start = np.searchsorted(item_cat, np.arange(n_c), side="left")
    cat_end = np.searchsorted(item_cat, np.arange(n_c), side="right")
    pop_cum = np.concatenate([[0.0], np.cumsum(item_pop)])

    # Users: a few favourite categories and a price level.
    taste = np.zeros((n_u, n_c))
    for k in range(config.favourite_categories):
        fav = rng.choice(n_c, size=n_u, p=cat_share)
        taste[np.arange(n_u), fav] += rng.gamma(2.0, 1.0, size=n_u) / (k + 1)
    taste = taste / taste.sum(axis=1, keepdims=True)
    taste = (1 - config.explore) * taste + config.explore * cat_share[None, :]
    taste_cum = np.cumsum(taste, axis=1)
    user_log_price = rng.normal(3.5, 0.7, size=n_u)
    price_tolerance = rng.uniform(0.3, 0.8, size=n_u)

    # Views: every user at least one; activity is skewed (a few heavy users).
    events_per_view = 1.38  # with the clicks, carts and purchases that follow (measured)
    n_views = max(int(config.n_events / events_per_view), n_u)
    activity = rng.pareto(2.0, size=n_u) + 0.2
    extra = rng.choice(n_u, size=n_views - n_u, p=activity / activity.sum())
    view_user = np.concatenate([np.arange(n_u), extra])
    view_cat = _pick_rows(taste_cum[view_user], rng)

    # Consider a few popular items of the category, pick one by price fit.
    lo, hi = pop_cum[cat_start[view_cat]], pop_cum[cat_end[view_cat]]
    draws = lo[:, None] + rng.random((n_views, config.consideration)) * (hi - lo)[:, None]
    considered = np.clip(np.searchsorted(pop_cum, draws, side="right") - 1, 0, n_i - 1)
    gap = item_log_price[considered] - user_log_price[view_user][:, None]
    fit = np.exp(-0.5 * (gap / price_tolerance[view_user][:, None]) ** 2)
    choice = _pick_rows(np.cumsum(fit + 1e-3, axis=1), rng)
    view_item = considered[np.arange(n_views), choice]
    match = fit[np.arange(n_views), choice] * (0.4 + 0.6 * taste[view_user, view_cat] / taste.max())

    # Funnel: a better match converts more often.
    clicked = rng.random(n_views) < 0.08 + 0.45 * match
    carted = clicked & (rng.random(n_views) < 0.10 + 0.40 * match)
    bought = carted & (rng.random(n_views) < 0.25 + 0.45 * match)

    # Times: views spread over the window, follow-ups seconds to minutes later.
    span = config.days * 86400.0
    t_view = end_ts - span + np.sort(rng.random(n_views)) * (span - 3600.0)
    t_click = t_view + rng.exponential(20.0, n_views) + 1.0
    t_cart = t_click + rng.exponential(90.0, n_views) + 1.0
    t_buy = t_cart + rng.exponential(240.0, n_views) + 1.0
    ts = np.concatenate([t_view, t_click[clicked], t_cart[carted], t_buy[bought]])
    user = np.concatenate([view_user, view_user[clicked], view_user[carted], view_user[bought]])
    item = np.concatenate([view_item, view_item[clicked], view_item[carted], view_item[bought]])
    kind = np.concatenate(
        [
            np.full(n_views, EventType.VIEW),
            np.full(int(clicked.sum()), EventType.CLICK),
            np.full(int(carted.sum()), EventType.ADD_TO_CART),
            np.full(int(bought.sum()), EventType.PURCHASE),
        ]
    )
    order = np.argsort(ts, kind="stable")
    catalogue = Catalogue(
        item_ids=[f"i{i}" for i in range(n_i)],
        categories=[f"c{c}" for c in item_cat.tolist()],
        prices=np.round(np.exp(item_log_price), 2),
    )
    events = EventLog(
        ts=np.round(ts[order], 3),
        user=user[order].astype(np.int32),
        item=item[order].astype(np.int32),
        type=kind[order].astype(np.int8),
        user_ids=[f"u{u}" for u in range(n_u)],
        item_ids=catalogue.item_ids,
    )
    return SyntheticData(catalogue=catalogue, events=events)
