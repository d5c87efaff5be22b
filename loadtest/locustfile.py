"""Locust load test that looks like a shop's web frontend, with an SLO gate.

Traffic (weights are settings): recommendations for known users (ids drawn from
the seeded population), for unknown users, with explicit candidates, and
behaviour events (views and clicks on what was just recommended, carrying its
request_id). Closed loop by default (each simulated user sends its next request
as soon as the last one is answered); with RECSVC_LOADTEST_RATE > 0, a fixed
total rate split evenly across the users (locust's constant_throughput).

When locust quits, the gate prints a table (requests, RPS, p50/p95/p99/max,
failures per endpoint) and sets the exit code: 0 when the recommendation p99 is
at most RECSVC_SLO_P99_MS (default 35) and at most RECSVC_SLO_MAX_FAILURE_RATIO
(default 0.001) of all requests failed, else 1.

Settings (environment): RECSVC_LOADTEST_KNOWN_USERS (20000), RECSVC_LOADTEST_ITEMS
(5000), RECSVC_LOADTEST_CANDIDATES (200), RECSVC_LOADTEST_USERS (the -u count,
to split the rate), RECSVC_LOADTEST_WEIGHTS ("known=70,unknown=10,candidates=10,
events=10"), RECSVC_LOADTEST_RESULTS (a directory for summary.json),
RECSVC_LOADTEST_KEY (an API key with the recommend and events scopes, sent as
`Authorization: Bearer` when the service has keys; loadtest/run makes one when
it starts the demo).

    locust -f loadtest/locustfile.py --headless -u 16 -r 16 --run-time 30s \\
        --host http://127.0.0.1:8080
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from locust import FastHttpUser, constant, constant_throughput, events
from locust.env import Environment

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slo  # next to this file; locust does not import loadtest as a package


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


KNOWN_USERS = int(_env("RECSVC_LOADTEST_KNOWN_USERS", "20000"))
ITEMS = int(_env("RECSVC_LOADTEST_ITEMS", "5000"))
CANDIDATES = int(_env("RECSVC_LOADTEST_CANDIDATES", "200"))
RATE = float(_env("RECSVC_LOADTEST_RATE", "0"))
USERS = max(int(_env("RECSVC_LOADTEST_USERS", "1")), 1)
WEIGHTS = dict(
    (k, int(v))
    for k, v in (
        part.split("=")
        for part in _env(
            "RECSVC_LOADTEST_WEIGHTS", "known=70,unknown=10,candidates=10,events=10"
        ).split(",")
    )
)
SLO_P99_MS = float(_env("RECSVC_SLO_P99_MS", "35"))
MAX_FAILURE_RATIO = float(_env("RECSVC_SLO_MAX_FAILURE_RATIO", "0.001"))
MIN_MODEL_SHARE = float(_env("RECSVC_SLO_MIN_MODEL_SHARE", "0.99"))
# Answers to requests for known users, by strategy ("model") or fallback reason.
ANSWERS: dict[str, int] = {}
KEY = _env("RECSVC_LOADTEST_KEY", "")
HEADERS = {"content-type": "application/json"} | ({"authorization": f"Bearer {KEY}"} if KEY else {})


class Shopper(FastHttpUser):
    """One browser tab of the shop: asks for recommendations, clicks on some."""

    wait_time = constant_throughput(RATE / USERS) if RATE > 0 else constant(0)

    def on_start(self) -> None:
        self.last: tuple[str, str, list[str]] | None = None  # user, request_id, items
        if RATE > 0:
            # Spread the tabs over one period: started together, constant_throughput
            # keeps them in step, and 32 requests arriving at once every period is
            # a synthetic burst (the last ones queue 32 requests deep), not traffic.
            time.sleep(random.uniform(0, USERS / RATE))  # gevent-patched: cooperative

    def _recommend(self, body: dict[str, Any], known: bool = True) -> None:
        with self.client.post(
            slo.RECOMMEND,
            data=json.dumps(body),
            headers=HEADERS,
            name=slo.RECOMMEND,
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
                return
            answer = resp.json()
            if known:
                what = answer.get("fallback_reason") or answer.get("strategy", "?")
                ANSWERS[what] = ANSWERS.get(what, 0) + 1
            items = [i["item_id"] for i in answer.get("items", [])]
            if not items:
                resp.failure("no items in the answer")
                return
            self.last = (body["user_id"], answer["request_id"], items)

    def known(self) -> None:
        self._recommend({"user_id": f"u{random.randrange(KNOWN_USERS)}", "n": 10})

    def unknown(self) -> None:
        self._recommend({"user_id": f"visitor-{uuid.uuid4().hex[:12]}", "n": 10}, known=False)

    def candidates(self) -> None:
        ids = [f"i{k}" for k in random.sample(range(ITEMS), min(CANDIDATES, ITEMS))]
        self._recommend(
            {"user_id": f"u{random.randrange(KNOWN_USERS)}", "n": 10, "candidates": ids}
        )

    def event(self) -> None:
        if self.last is None:
            self.known()
            return
        user, request_id, items = self.last
        body = {
            "event_id": uuid.uuid4().hex,
            "user_id": user,
            "item_id": random.choice(items),
            "type": random.choice(("view", "view", "click")),
            "request_id": request_id,
        }
        with self.client.post(
            slo.EVENTS, data=json.dumps(body), headers=HEADERS, name=slo.EVENTS, catch_response=True
        ) as resp:
            if resp.status_code != 200 or resp.json().get("accepted") != 1:
                resp.failure(f"status {resp.status_code}")

    tasks = {  # noqa: RUF012  (locust's own class attribute)
        known: WEIGHTS.get("known", 0),
        unknown: WEIGHTS.get("unknown", 0),
        candidates: WEIGHTS.get("candidates", 0),
        event: WEIGHTS.get("events", 0),
    }


def _rows(environment: Environment) -> list[slo.Row]:
    rows = []
    for entry in sorted(environment.stats.entries.values(), key=lambda e: e.name):
        if entry.num_requests == 0:
            continue
        rows.append(
            slo.Row(
                name=entry.name,
                requests=entry.num_requests,
                failures=entry.num_failures,
                rps=entry.total_rps,
                p50=entry.get_response_time_percentile(0.50),
                p95=entry.get_response_time_percentile(0.95),
                p99=entry.get_response_time_percentile(0.99),
                max=entry.max_response_time,
            )
        )
    return rows


@events.quitting.add_listener
def gate(environment: Environment, **_: object) -> None:
    rows = _rows(environment)
    passed, reasons = slo.verdict(
        rows, SLO_P99_MS, MAX_FAILURE_RATIO, dict(ANSWERS), MIN_MODEL_SHARE
    )
    mode = f"fixed rate {RATE:g}/s" if RATE > 0 else "closed loop"
    print(f"\nrecsvc load test ({mode}), SLO p99 <= {SLO_P99_MS:g} ms on {slo.RECOMMEND}")
    print(slo.table(rows))
    print(slo.answers_line(ANSWERS))
    print(("PASS: " if passed else "FAIL: ") + "; ".join(reasons), flush=True)
    results = os.environ.get("RECSVC_LOADTEST_RESULTS")
    if results:
        Path(results).mkdir(parents=True, exist_ok=True)
        summary = {
            "mode": mode,
            "rate": RATE,
            "slo_p99_ms": SLO_P99_MS,
            "passed": passed,
            "reasons": reasons,
            "rows": [r.as_dict() for r in rows],
            "answers_for_known_users": dict(ANSWERS),
            "model_share": slo.model_share(ANSWERS),
            "min_model_share": MIN_MODEL_SHARE,
        }
        (Path(results) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    environment.process_exit_code = 0 if passed else 1
