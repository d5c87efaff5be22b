"""Groups from logged impressions, as the replay of ``features.dataset`` takes them.

A replay takes the impressions in time order between the events. A training
impression (before the split) with a labelled outcome gives a group of its
shown items that the replay knows, graded, with their served positions; a
sampled held-out impression with one gives the impression protocol what the
next-event protocol gets, plus the shown items. The replay computes the
features; this module decides what goes in and counts what does not.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from features.candidates import CandidateConfig, Retrieval, assemble
from features.evaluation import baselines
from features.impression_eval import ImpressionEvalGroup, ImpressionEvalSet
from features.impressions import Impression, ImpressionLog, Labels, label
from features.schema import build_matrix
from features.state import ItemTable, UserState


@dataclass(slots=True)
class ImpressionStats:
    """What became of the logged impressions."""

    read: int = 0
    train: int = 0
    held_out: int = 0
    groups: int = 0
    dropped_no_positive: int = 0
    # Every shown item got the same grade: no pair to order.
    dropped_one_grade: int = 0
    dropped_unknown_user: int = 0
    # Shown items the replay did not know yet (left out of their group).
    shown_items_unknown: int = 0
    labels: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        return {
            "impressions": self.read,
            "train_impressions": self.train,
            "held_out_impressions": self.held_out,
            "train_groups": self.groups,
            "dropped_no_positive": self.dropped_no_positive,
            "dropped_one_grade": self.dropped_one_grade,
            "dropped_unknown_user": self.dropped_unknown_user,
            "shown_items_unknown": self.shown_items_unknown,
            "labels": self.labels,
        }


@dataclass(slots=True)
class ShownGroup:
    """A training group's items (table rows), grades and served positions (1 = first)."""

    rows: np.ndarray
    labels: np.ndarray
    positions: np.ndarray


@dataclass(slots=True)
class Logged:
    """The impressions a replay takes, in time order (each with whether it is a
    held-out one to evaluate on), their labels, and what became of them."""

    queue: list[tuple[Impression, bool]]
    labels: Labels
    stats: ImpressionStats
    test: ImpressionEvalSet
    next: int = 0
    users: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        log: ImpressionLog,
        split_ts: float,
        window: float,
        eval_groups: int,
        seed: int,
        top_n: int,
        train: bool = True,
    ) -> Logged:
        """The queue: training impressions with an outcome (unless not ``train``), and
        up to ``eval_groups`` held-out ones with an outcome, drawn with ``seed``."""
        labels = label(log, window, split_ts)
        held = [imp for imp in log.impressions if imp.ts >= split_ts]
        stats = ImpressionStats(
            read=len(log.impressions),
            train=len(log.impressions) - len(held),
            held_out=len(held),
            labels=labels.stats.summary(),
        )
        labelled = [imp for imp in held if imp.request_id in labels.grades]
        # Their own stream: the evaluated impressions do not depend on the others.
        rng = np.random.default_rng([seed, 2])
        k = min(max(eval_groups, 0), len(labelled))
        pick = rng.choice(len(labelled), size=k, replace=False) if k else np.zeros(0, np.int64)
        chosen = {labelled[j].request_id for j in pick.tolist()}
        queue = []
        for imp in log.impressions:
            if imp.ts >= split_ts:
                if imp.request_id in chosen:
                    queue.append((imp, True))
            elif not train:
                continue
            elif imp.request_id in labels.grades:
                queue.append((imp, False))
            else:
                stats.dropped_no_positive += 1
        test = ImpressionEvalSet(
            top_n=top_n, held_out=len(held), labelled=len(labelled), sampled=len(chosen)
        )
        return cls(queue, labels, stats, test)

    def due(self, until: float) -> Iterator[tuple[Impression, bool]]:
        """The queued impressions up to ``until``, each once."""
        while self.next < len(self.queue) and self.queue[self.next][0].ts <= until:
            self.next += 1
            yield self.queue[self.next - 1]

    def unknown_user(self, held_out: bool) -> None:
        if held_out:
            self.test.skipped_unknown_user += 1
        else:
            self.stats.dropped_unknown_user += 1

    def shown_group(self, imp: Impression, table: ItemTable) -> ShownGroup | None:
        """The shown items the replay knows, graded, with their served positions;
        None (counted) when they would carry no gradient."""
        grades = self.labels.grades[imp.request_id]
        rows, positions, labels = [], [], []
        for position, item_id in enumerate(imp.items, start=1):
            i = table.index.get(item_id)
            if i is None:
                self.stats.shown_items_unknown += 1
            elif i not in rows:
                rows.append(i)
                positions.append(position)
                labels.append(grades.get(item_id, 0))
        if not any(labels):
            self.stats.dropped_no_positive += 1
            return None
        if min(labels) == max(labels):
            self.stats.dropped_one_grade += 1
            return None
        self.stats.groups += 1
        return ShownGroup(
            np.asarray(rows, dtype=np.int64),
            np.asarray(labels, dtype=np.float64),
            np.asarray(positions, dtype=np.int32),
        )

    def known_grades(self, imp: Impression, table: ItemTable) -> dict[int, int] | None:
        """A held-out impression's grades by item row; None (counted) when the
        replay knows none of its labelled items."""
        index = table.index
        grades = {index[i]: g for i, g in self.labels.grades[imp.request_id].items() if i in index}
        if not grades:
            self.test.skipped_no_known_label += 1
            return None
        return grades

    def add_eval_group(
        self,
        imp: Impression,
        grades: dict[int, int],
        user: UserState,
        table: ItemTable,
        found: Retrieval,
        config: CandidateConfig,
    ) -> None:
        """What the next-event protocol keeps (candidates, their rows, the baselines'
        lists), plus the shown items, their rows and the grades."""
        cand = assemble(found, config)
        known = (table.index.get(i) for i in dict.fromkeys(imp.items))
        shown = np.asarray([i for i in known if i is not None], dtype=np.int64)
        self.test.groups.append(
            ImpressionEvalGroup(
                candidates=cand.index,
                matrix=build_matrix(user, table, cand.index, imp.ts, retrieval=found),
                baselines=baselines(found, self.test.top_n),
                shown=shown,
                shown_matrix=build_matrix(user, table, shown, imp.ts, retrieval=found),
                grades=grades,
                user=self.users.setdefault(imp.user_id, len(self.users)),
            )
        )
