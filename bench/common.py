"""What every benchmark shares: a fresh database, server processes, load-generator
processes, CPU accounting, and the result rows."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

import migrations
from server.auth import mint_token
from server.devservices import free_port
from server.settings import Settings
from tests import pg
from tests.conftest import TEST_SECRET
from tests.procs import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@dataclass
class Row:
    id: str
    what: str
    ours: float
    baseline: float | None
    unit: str
    target: str
    passed: bool | None
    details: dict[str, Any] = field(default_factory=dict)
    # The run's invariants held (zero oversell, no errors, nothing missing); a target
    # is met only if every repeat was sound, whatever the medians say.
    sound: bool = True

    @property
    def ratio(self) -> float | None:
        return round(self.ours / self.baseline, 3) if self.baseline else None


def token(permissions: tuple[str, ...] = ("*",), sub: str = "bench") -> str:
    s = Settings(jwt_hs256_secret=TEST_SECRET)
    return mint_token(s, sub=sub, permissions=list(permissions), channels=["*"], ttl_seconds=24 * 3600)


class Database:
    """A fresh, migrated database for one benchmark run (dropped afterwards)."""

    def __init__(self) -> None:
        self.url, self.name = pg.create_database("entrepot_bench")
        migrations.upgrade(self.url)

    def drop(self) -> None:
        pg.drop_database(self.name)


def start_server(db: Database, **env: str) -> ServerProcess:
    return ServerProcess(db.url, **env).start()


def start_bare_server() -> tuple[subprocess.Popen[bytes], str]:
    target = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "bench.bare_server", "--listen", target], cwd=ROOT)
    from server.devservices import wait_for_port

    host, port = target.split(":")
    wait_for_port(host, int(port), 20)
    return proc, target


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def database_cpu_seconds() -> float:
    """CPU seconds of every PostgreSQL process on this machine (machine or embedded
    server). A lower bound over a run: a backend that exits takes its count with it,
    so take both readings while the server under test still holds its pool."""
    total = 0.0
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] != "postgres":
            continue
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue  # exited between listing and reading
        total += t.user + t.system
    return total


class CpuMeter:
    """CPU of each side of a measurement, from construction to `per_call`: the server
    process, every PostgreSQL process, and the client (this process, or with
    `children=True` the child processes it has waited for). On 2 cores the sum of the
    three per call bounds the rate (docs/performance.md)."""

    def __init__(self, server_pid: int | Sequence[int], *, children: bool = False) -> None:
        self.servers = [server_pid] if isinstance(server_pid, int) else list(server_pid)  # several: their sum
        self.who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
        self.start = self._read()

    def _read(self) -> tuple[float, float, float]:
        server = sum(cpu_seconds(pid) for pid in self.servers)
        own = resource.getrusage(self.who)
        return server, database_cpu_seconds(), own.ru_utime + own.ru_stime

    def per_call(self, calls: int, *, unit: str = "ms_per_call", scale: float = 1e3) -> dict[str, float]:
        end, n = self._read(), max(calls, 1)
        sides = ("server", "db", "client")
        return {
            f"{side}_cpu_{unit}": round((b - a) * scale / n, 3)
            for side, a, b in zip(sides, self.start, end, strict=True)
        }


def loadgen(
    target: str,
    scenario: str,
    *,
    concurrency: int,
    duration: float,
    tok: str = "",
    channel: str = "",
    skus: int = 1,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """Run bench.loadgen in its own process; adds the server's and the database's CPU
    seconds over the run."""
    before = cpu_seconds(server_pid) if server_pid else 0.0
    db_before = database_cpu_seconds()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.loadgen",
            "--target",
            target,
            "--token",
            tok,
            "--channel",
            channel,
            "--scenario",
            scenario,
            "--concurrency",
            str(concurrency),
            "--duration",
            str(duration),
            "--skus",
            str(skus),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if server_pid:
        result["server_cpu_s"] = round(cpu_seconds(server_pid) - before, 3)
    result["db_cpu_s"] = round(database_cpu_seconds() - db_before, 3)
    return result


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor()
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "database": "TEST_DATABASE_URL" if os.environ.get("TEST_DATABASE_URL") else "embedded PostgreSQL",
    }


def print_table(rows: list[Row]) -> None:
    header = f"{'id':<4} {'what':<52} {'ours':>12} {'baseline':>12} {'ratio':>7} {'target':>22} {'pass':>5}"
    print(header)
    print("-" * len(header))
    for r in rows:
        base = f"{r.baseline:,.1f}" if r.baseline else "-"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        ok = "-" if r.passed is None else ("yes" if r.passed else "NO")
        print(
            f"{r.id:<4} {r.what[:52]:<52} {r.ours:>10,.1f} {r.unit[:2]:<1} {base:>12} {ratio:>7} {r.target:>22} {ok:>5}"
        )


def write_json(rows: list[Row], name: str, extra: dict[str, Any] | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    payload = {"machine": machine(), "rows": [asdict(r) | {"ratio": r.ratio} for r in rows], **(extra or {})}
    path.write_text(json.dumps(payload, indent=2))
    return path
