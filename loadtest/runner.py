"""One command for the load test: start the demo (unless --host), run locust
headless for a bounded time, keep the HTML report and CSVs, print the summary and
exit with the SLO gate's code.

Modes:
  auto (default)  a closed-loop run measures capacity (requests/s at saturation),
                  then a fixed-rate run at --fraction (70%) of it is gated
  --rate R        only a fixed-rate run at R requests/s, gated
  --closed        only a closed-loop run, gated

When it starts the demo, the demo has an API key (a fresh random one named
``loadtest``, recommend and events scopes), so the gated run pays for the key
check as production does; locust sends it (RECSVC_LOADTEST_KEY). ``--no-keys``
runs the demo open. With ``--host``, set RECSVC_LOADTEST_KEY to a key of that
service when it has keys.

    loadtest/run [--host URL] [--workers N] [--run-time 60] [--users 32] [--rate R]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"
READY_TIMEOUT_SECS = 600.0  # a fresh clone seeds and trains first (~1 min here)
SCORER_WAIT_SECS = 60.0  # the first compile of a model takes a few seconds


def _get(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return dict(json.loads(resp.read()))
    except (OSError, ValueError):
        return None


def _wait_ready(host: str, proc: subprocess.Popen[bytes] | None) -> dict[str, Any]:
    """Until /readyz says ready with a model; then up to SCORER_WAIT_SECS more for
    the compiled scorer (with several workers, /readyz answers from any of them)."""
    started = time.monotonic()
    ready_at: float | None = None
    body: dict[str, Any] | None = None
    while time.monotonic() - started < READY_TIMEOUT_SECS:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the demo exited with code {proc.returncode}")
        body = _get(f"{host}/readyz")
        if body and body.get("status") == "ready" and body.get("model"):
            ready_at = ready_at or time.monotonic()
            if body["model"].get("scorer") != "native":
                return body
            if time.monotonic() - ready_at > SCORER_WAIT_SECS:
                return body
        time.sleep(0.5)
    if ready_at is not None and body is not None:
        return body
    raise SystemExit(f"{host} was not ready within {READY_TIMEOUT_SECS:.0f} s")


# Cores for the service and for locust when this script starts the demo on a
# machine with several: locust, in Python, needs about a core of its own at the
# rates it offers here, and sharing the service's cores measured the machine's
# contention, not the service (turned away and late answers at "70%").
CORES = sorted(os.sched_getaffinity(0))
SERVICE_CORES = set(CORES[: max(1, len(CORES) // 2)])
CLIENT_CORES = set(CORES) - SERVICE_CORES or set(CORES)


def _pin(cores: set[int]) -> Any:
    def pin() -> None:
        os.sched_setaffinity(0, cores)

    return pin


def _locust(
    host: str,
    out: Path,
    users: int,
    run_time: int,
    rate: float,
    slo: str | None,
    cores: set[int] | None = None,
) -> tuple[int, dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        RECSVC_LOADTEST_RATE=str(rate),
        RECSVC_LOADTEST_USERS=str(users),
        RECSVC_LOADTEST_RESULTS=str(out),
    )
    if slo is not None:
        env["RECSVC_SLO_P99_MS"] = slo
    cmd = [
        sys.executable,
        "-m",
        "locust",
        *("-f", str(LOCUSTFILE), "--headless", "--only-summary"),
        *("-u", str(users), "-r", str(users), "--run-time", f"{run_time}s"),
        *("--stop-timeout", "5", "--host", host),
        *("--csv", str(out / "locust"), "--html", str(out / "report.html")),
        *("--loglevel", "WARNING"),
    ]
    with (out / "locust.log").open("wb") as log:
        code = subprocess.run(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
            preexec_fn=_pin(cores) if cores else None,
        )
    text = (out / "locust.log").read_text(errors="replace")
    start = text.find("recsvc load test")
    gate = text[start:].split("\n[", 1)[0].split("\nType ", 1)[0] if start >= 0 else text[-3000:]
    print(gate.rstrip(), flush=True)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return code.returncode, summary


def _total_rps(summary: dict[str, Any]) -> float:
    """Answered requests per second (failures, such as 503s, are not capacity)."""
    return float(
        sum(
            r["rps"] * (1.0 - r["failures"] / r["requests"])
            for r in summary.get("rows", [])
            if r["requests"]
        )
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", help="test this running service instead of starting the demo")
    p.add_argument("--data-dir", default="recsvc-data", help="the demo's data directory")
    p.add_argument("--port", type=int, default=8089, help="the demo's port")
    p.add_argument("--workers", type=int, default=1, help="the demo's worker processes")
    p.add_argument("--users", type=int, default=32, help="simulated frontend tabs")
    p.add_argument("--run-time", type=int, default=60, help="seconds of the gated run")
    p.add_argument("--capacity-time", type=int, default=20, help="seconds of the capacity run")
    p.add_argument(
        "--capacity-users",
        type=int,
        default=8,
        help="closed-loop tabs of the capacity run: enough to keep the workers busy, few "
        "enough that admission control turns none away (a tab retries a 503 at once)",
    )
    p.add_argument("--fraction", type=float, default=0.7, help="share of capacity to offer")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float, help="fixed total requests/s (skips capacity)")
    mode.add_argument("--closed", action="store_true", help="closed loop only")
    p.add_argument("--slo-p99-ms", help="overrides RECSVC_SLO_P99_MS")
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument(
        "--no-keys",
        action="store_true",
        help="start the demo without API keys (default: with a fresh key for locust)",
    )
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="share all cores between the demo and locust (default: half each)",
    )
    args = p.parse_args()

    out = args.results / datetime.now(UTC).strftime("loadtest-%Y%m%dT%H%M%SZ")
    proc = None
    host = args.host
    # Only when this script starts the demo on a machine with two cores or more.
    pinned = host is None and not args.no_pin and len(CORES) >= 2
    client = CLIENT_CORES if pinned else None
    if host is None:
        host = f"http://127.0.0.1:{args.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECSVC_")}
        if not args.no_keys:
            # Made here and handed over in environments only (never in argv, where
            # any user of the machine could read it).
            key = secrets.token_urlsafe(32)
            env["RECSVC_API_KEYS"] = f"loadtest:recommend+events:{key}"
            os.environ["RECSVC_LOADTEST_KEY"] = key  # for locust, which gets os.environ
            print("the demo has an API key (loadtest: recommend, events)", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        log = out / "demo.log"
        print(f"starting the demo on {host} (log: {log})", flush=True)
        proc = subprocess.Popen(
            [
                sys.executable,
                *("-m", "recsvc", "demo", "--port", str(args.port)),
                *("--data-dir", args.data_dir, "--workers", str(args.workers)),
            ],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_pin(SERVICE_CORES) if pinned else None,
        )
        if pinned:
            print(f"service on cores {sorted(SERVICE_CORES)}, locust on {sorted(client or ())}")
    try:
        ready = _wait_ready(host, proc)
        print(f"service ready: model {ready['model']}", flush=True)
        if args.closed:
            code, _ = _locust(
                host, out / "closed", args.users, args.run_time, 0, args.slo_p99_ms, client
            )
        else:
            rate = args.rate
            if rate is None:
                users = args.capacity_users
                print(f"\ncapacity: closed loop, {users} users, {args.capacity_time} s")
                _, cap = _locust(
                    host, out / "capacity", users, args.capacity_time, 0, args.slo_p99_ms, client
                )
                capacity = _total_rps(cap)
                if capacity <= 0:
                    raise SystemExit("the capacity run made no requests")
                rate = round(args.fraction * capacity, 1)
                print(f"capacity {capacity:.0f} requests/s; offering {rate:g}/s", flush=True)
            print(f"\nfixed rate {rate:g} requests/s, {args.users} users, {args.run_time} s")
            code, _ = _locust(
                host, out / "fixed", args.users, args.run_time, rate, args.slo_p99_ms, client
            )
        print(f"\nresults: {out} (report.html, CSVs, summary.json); exit code {code}")
        return code
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
