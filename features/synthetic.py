"""Synthetic shop: a catalogue, users with latent tastes, and their behaviour log.

Users prefer a few categories and a price level. They browse in sessions: a
few views minutes apart, the first drawn from one of their categories by
popularity and price fit, most of the rest from the same small cluster of
related items (a "style" within the category) as the first. They go on to
click, add to cart and purchase more often when the item fits. So a model that
sees category affinity, price fit and co-visitation can beat ranking by
popularity, as on a real shop. Deterministic for a seed; ``end_ts`` anchors
the log in time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features.events import EventType
from features.logs import Catalogue, EventLog

# Bumped when the generator's output changes for the same config, so a data
# directory written by an older version is not mistaken for the current one.
GENERATOR_VERSION = 2


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
    # Views per browsing session (mean), seconds between them (mean), items per
    # cluster of related items, and the share of later views in the first's cluster.
    session_views: float = 3.0
    session_gap_secs: float = 40.0
    cluster_size: int = 8
    session_focus: float = 0.7


@dataclass(frozen=True, slots=True)
class Latent:
    """What the generator knows and a model must learn: each user's category tastes
    and price level, each item's category and price (a simulator's ground truth)."""

    taste: np.ndarray  # (users, categories), rows sum to 1
    user_log_price: np.ndarray
    price_tolerance: np.ndarray
    item_category: np.ndarray
    item_log_price: np.ndarray

    def match(self, user: int, items: np.ndarray) -> np.ndarray:
        """How well items fit a user (0..1), as the generator's funnel uses it."""
        gap = self.item_log_price[items] - self.user_log_price[user]
        fit = np.exp(-0.5 * (gap / self.price_tolerance[user]) ** 2)
        taste = self.taste[user, self.item_category[items]] / self.taste.max()
        return np.asarray(fit * (0.4 + 0.6 * taste))


@dataclass(frozen=True, slots=True)
class SyntheticData:
    catalogue: Catalogue
    events: EventLog
    latent: Latent | None = None


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

    # Clusters of related items: consecutive blocks within each category.
    local = np.arange(n_i) - cat_start[item_cat]
    _, item_cluster = np.unique(item_cat * n_i + local // config.cluster_size, return_inverse=True)
    n_cl = int(item_cluster.max()) + 1
    cl_start = np.searchsorted(item_cluster, np.arange(n_cl), side="left")
    cl_end = np.searchsorted(item_cluster, np.arange(n_cl), side="right")

    # Sessions: every user at least one; activity is skewed (a few heavy users).
    events_per_view = 1.38  # with the clicks, carts and purchases that follow (measured)
    n_views_wanted = max(int(config.n_events / events_per_view), n_u)
    n_sessions = max(int(n_views_wanted / config.session_views), n_u)
    activity = rng.pareto(2.0, size=n_u) + 0.2
    extra = rng.choice(n_u, size=n_sessions - n_u, p=activity / activity.sum())
    session_user = np.concatenate([np.arange(n_u), extra])
    session_cat = _pick_rows(taste_cum[session_user], rng)
    length = rng.geometric(1.0 / config.session_views, size=n_sessions)
    first = np.concatenate([[0], np.cumsum(length)[:-1]])
    view_session = np.repeat(np.arange(n_sessions), length)
    n_views = len(view_session)
    position = np.arange(n_views) - first[view_session]
    view_user = session_user[view_session]
    view_cat = session_cat[view_session]

    def pick(
        views: np.ndarray, lo_item: np.ndarray, hi_item: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Consider a few popular items of [lo_item, hi_item), pick one by price fit."""
        lo, hi = pop_cum[lo_item], pop_cum[hi_item]
        draws = lo[:, None] + rng.random((len(views), config.consideration)) * (hi - lo)[:, None]
        considered = np.clip(
            np.searchsorted(pop_cum, draws, side="right") - 1,
            lo_item[:, None],
            hi_item[:, None] - 1,
        )
        gap = item_log_price[considered] - user_log_price[view_user[views]][:, None]
        fit = np.exp(-0.5 * (gap / price_tolerance[view_user[views]][:, None]) ** 2)
        choice = _pick_rows(np.cumsum(fit + 1e-3, axis=1), rng)
        rows = np.arange(len(views))
        return considered[rows, choice], fit[rows, choice]

    # The session's first view sets its cluster; later views mostly stay in it.
    view_item = np.zeros(n_views, dtype=np.int64)
    view_fit = np.zeros(n_views)
    anchors = np.flatnonzero(position == 0)
    c = view_cat[anchors]
    view_item[anchors], view_fit[anchors] = pick(anchors, cat_start[c], cat_end[c])
    later = np.flatnonzero(position > 0)
    anchor_cluster = item_cluster[view_item[first[view_session[later]]]]
    focused = rng.random(len(later)) < config.session_focus
    c = view_cat[later]
    lo_item = np.where(focused, cl_start[anchor_cluster], cat_start[c])
    hi_item = np.where(focused, cl_end[anchor_cluster], cat_end[c])
    view_item[later], view_fit[later] = pick(later, lo_item, hi_item)
    match = view_fit * (0.4 + 0.6 * taste[view_user, view_cat] / taste.max())

    # Funnel: a better match converts more often.
    clicked = rng.random(n_views) < 0.08 + 0.45 * match
    carted = clicked & (rng.random(n_views) < 0.10 + 0.40 * match)
    bought = carted & (rng.random(n_views) < 0.25 + 0.45 * match)

    # Times: sessions spread over the window, views in a session ~a minute
    # apart, follow-ups seconds to minutes after their view.
    span = config.days * 86400.0
    start = end_ts - span + rng.random(n_sessions) * (span - 3 * 3600.0)
    gaps = np.where(position > 0, rng.exponential(config.session_gap_secs, n_views), 0.0)
    elapsed = np.cumsum(gaps)
    t_view = start[view_session] + np.minimum(elapsed - elapsed[first[view_session]], 3600.0)
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
    latent = Latent(taste, user_log_price, price_tolerance, item_cat, item_log_price)
    return SyntheticData(catalogue=catalogue, events=events, latent=latent)
