"""P2 / P3 for `make bench`: ReserveStock(1) with 64 callers through a real server
(group commit and, for comparison, one transaction per call) next to `pgbench -c 64`
running the plain conditional UPDATE, hot SKU (P2) and spread over 10,000 SKUs (P3),
and the ceiling: the same client against a bare grpc.aio server answering a constant.

The cases live in bench/reserve.py (also runnable alone: `python -m bench.reserve`);
each case gets its own fresh database on the same PostgreSQL as `db`.
"""

from __future__ import annotations

from typing import Any

from bench.common import Database, Row
from bench.reserve import run_pgbench
from bench.reserve_server import run_bare_case, run_server_case
from tests.inventory_support import migrated_database
from tests.pg import drop_database

CLIENTS = 64


def _case(fn: Any) -> dict[str, Any]:
    url, name = migrated_database("entrepot_bench")
    try:
        return fn(url)  # type: ignore[no-any-return]
    finally:
        drop_database(name)


def run(db: Database, duration: float, *, smoke: bool = False) -> list[Row]:
    secs = max(1, int(duration))
    rows: list[Row] = []
    # What any ReserveStock server can reach here with this client: a bare grpc.aio
    # server answering a constant. Its ratio to pgbench is the best a Python server
    # on this machine could show (rows P2c/P3c).
    ceiling = run_bare_case(clients=CLIENTS, seconds=secs)
    for pid, spread in (("P2", False), ("P3", True)):
        label = "10,000 SKUs" if spread else "one hot SKU"
        base = _case(lambda u, sp=spread: run_pgbench(u, spread=sp, clients=CLIENTS, seconds=secs))
        ours = _case(
            lambda u, sp=spread: run_server_case(u, spread=sp, batched=True, clients=CLIENTS, seconds=secs)
        )
        naive = _case(
            lambda u, sp=spread: run_server_case(u, spread=sp, batched=False, clients=CLIENTS, seconds=secs)
        )
        # P2 against pgbench; P3 against the transport's ceiling (P3c), pgbench beside it.
        baseline, target, need = (
            (ceiling["tps"], ">= 0.8x of P3c", 0.8)
            if spread
            else (base["tps"], ">= 1.3x, zero oversell", 1.3)
        )
        rows.append(
            Row(
                pid,
                f"ReserveStock(1) {label}, 64 callers, group commit",
                ours["tps"],
                baseline,
                "reservations/s",
                target,
                bool(ours["consistent"]) and ours["tps"] >= need * baseline,
                {"ours": ours, "pgbench": base, "ceiling": ceiling},
                sound=bool(ours["consistent"]),
            )
        )
        rows.append(
            Row(
                pid + "n",
                f"ReserveStock(1) {label}, one transaction per call",
                naive["tps"],
                base["tps"],
                "reservations/s",
                "(comparison, vs pgbench)",
                None,
                {"naive": naive},
                sound=bool(naive["consistent"]),
            )
        )
        rows.append(
            Row(
                pid + "c",
                "ReserveStock on bare grpc.aio (constant): ceiling",
                ceiling["tps"],
                base["tps"],
                "calls/s",
                "(vs pgbench)",
                None,
                {"bare": ceiling},
            )
        )
    return rows
