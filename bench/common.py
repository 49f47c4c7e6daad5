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


@dataclass(frozen=True)
class Target:
    """A TARGETS.md row: `measure` (ours, or ratio = ours / baseline) at least or at most `value`,
    and, when `ours_at_least` is set, ours at least that as well."""

    text: str
    measure: str
    value: float
    at_most: bool = False
    ours_at_least: float | None = None

    def met(self, ours: float, ratio: float | None) -> bool:
        got = ours if self.measure == "ours" else ratio
        if got is None:
            return False
        if self.ours_at_least is not None and ours < self.ours_at_least:
            return False
        return got <= self.value if self.at_most else got >= self.value


# By row id, as in /work/shared/design/TARGETS.md; judged on the medians of the repeats.
# A row id not here (comparison rows) keeps its module's verdict, met when most repeats met it.
TARGETS = {
    "P1": Target(">= 0.7x bare grpc.aio", "ratio", 0.7),
    "P2": Target(">= 1.3x pgbench, 0 oversell", "ratio", 1.3),
    "P3": Target(">= 0.8x of P3c", "ratio", 0.8),
    "P4": Target(">= 0.5x of P4f, >= 50k/s", "ratio", 0.5, ours_at_least=50_000),
    "P5": Target("p99 <= 35 ms", "ours", 35.0, at_most=True),
    "P5o": Target("p99 <= 50 ms", "ours", 50.0, at_most=True),
    "P6": Target("p99 <= 250 ms, 0 lost, RSS", "ours", 250.0, at_most=True),
    "P7": Target(">= 0.9x fresh", "ratio", 0.9),
}


def median(values: Sequence[float]) -> float:
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


@dataclass
class Summary:
    """One P row over its repeats: medians, spreads (min, max), and the verdict."""

    id: str
    what: str
    unit: str
    target: str
    repeats: int
    ours: float
    ours_spread: tuple[float, float]
    baseline: float | None
    baseline_spread: tuple[float, float] | None
    ratio: float | None
    ratio_spread: tuple[float, float] | None
    sound: bool
    passed: bool | None


def summarize(repeats: list[list[Row]]) -> list[Summary]:
    """Rows of the same (id, what) across repeats, in first-seen order."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for rows in repeats:
        for r in rows:
            groups.setdefault((r.id, r.what), []).append(r)
    out = []
    for (rid, what), rows in groups.items():
        ours = [r.ours for r in rows]
        bases = [r.baseline for r in rows if r.baseline]
        ratios = [r.ratio for r in rows if r.ratio is not None]
        sound = all(r.sound for r in rows)
        target = TARGETS.get(rid)
        ratio = round(median(ratios), 3) if ratios else None
        passed: bool | None
        if target is not None:
            passed = sound and target.met(median(ours), ratio)
        else:
            verdicts = [r.passed for r in rows if r.passed is not None]
            passed = None if not verdicts else sound and sum(verdicts) * 2 > len(verdicts)
        out.append(
            Summary(
                rid,
                what,
                rows[0].unit,
                target.text if target else rows[0].target,
                len(rows),
                round(median(ours), 3),
                (min(ours), max(ours)),
                round(median(bases), 3) if bases else None,
                (min(bases), max(bases)) if bases else None,
                ratio,
                (min(ratios), max(ratios)) if ratios else None,
                sound,
                passed,
            )
        )
    return out


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.1f}"


def print_table(summaries: list[Summary]) -> None:
    """Medians, with [min-max] over the repeats when there are several."""
    header = (
        f"{'id':<5} {'what':<50} {'n':>2} {'ours (median [min-max])':>28} {'baseline':>9} "
        f"{'ratio [min-max]':>20} {'target':>28} {'pass':>5}"
    )
    print(header)
    print("-" * len(header))
    for s in summaries:
        ours = _num(s.ours) + (
            f" [{_num(s.ours_spread[0])}-{_num(s.ours_spread[1])}]" if s.repeats > 1 else ""
        )
        ours += f" {s.unit[:5]}"
        base = _num(s.baseline) if s.baseline else "-"
        ratio = "-"
        if s.ratio is not None and s.ratio_spread is not None:
            ratio = f"{s.ratio:.2f}x" + (
                f" [{s.ratio_spread[0]:.2f}-{s.ratio_spread[1]:.2f}]" if s.repeats > 1 else ""
            )
        ok = "-" if s.passed is None else ("yes" if s.passed else "NO")
        if not s.sound:
            ok += "!"
        print(
            f"{s.id:<5} {s.what[:50]:<50} {s.repeats:>2} {ours:>28} {base:>9} {ratio:>20} {s.target[:28]:>28} {ok:>5}"
        )


def write_json(
    repeats: list[list[Row]], summaries: list[Summary], name: str, extra: dict[str, Any] | None = None
) -> Path:
    """Every repeat's rows (with their details) and the summary the table printed."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    payload = {
        "machine": machine(),
        "summary": [asdict(s) for s in summaries],
        "runs": [[asdict(r) | {"ratio": r.ratio} for r in rows] for rows in repeats],
        **(extra or {}),
    }
    path.write_text(json.dumps(payload, indent=2))
    return path
