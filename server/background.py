"""Background jobs the server runs next to the RPCs (singletons across replicas via leases
or advisory locks). Every job lives here, in JOBS: each is `async def job(rt, holder) -> None`
that loops until cancelled. Servicers never import this module (import-linter).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from typing import Any

import domain.refund as refunds
from domain import inventory
from domain.platform import idempotency
from domain.registration import starter as registration_starter
from domain.shared import leases, outbox
from server.metrics import STOCK_DRIFT
from server.runtime import Runtime

log = logging.getLogger("entrepot.background")

Job = Callable[[Runtime, str], Coroutine[Any, Any, None]]


async def run_leased(
    rt: Runtime, holder: str, name: str, every: float, step: Callable[[Runtime], Awaitable[int]]
) -> None:
    """Run `step` every `every` seconds while this replica holds lease `name`."""
    ttl = timedelta(seconds=max(every * 3, 5))
    while True:
        try:
            async with rt.uow() as uow:
                mine = await leases.try_acquire(uow.session, name, holder, ttl)
                await uow.commit()
            if mine:
                done = await step(rt)
                if done:
                    log.info("background step", extra={"job": name, "rows": done})
        except asyncio.CancelledError:
            raise
        except Exception:
            # A database outage must not kill the loop; it retries on the next tick.
            log.warning("background job failed; retrying", exc_info=True, extra={"job": name})
        await asyncio.sleep(every)


async def _retention_step(rt: Runtime) -> int:
    s = rt.settings
    async with rt.uow() as uow:
        n = await idempotency.purge_older_than(uow.session, timedelta(hours=s.idempotency_retention_hours))
        n += await outbox.purge_older_than(uow.session, timedelta(hours=s.outbox_retention_hours))
        await uow.commit()
    return n


async def _inventory_sweeper(rt: Runtime, holder: str) -> None:
    """One replica at a time sweeps, through a transaction-scoped advisory lock."""
    await inventory.run_sweeper(rt.sessions, asyncio.Event(), interval=rt.settings.reservation_sweep_seconds)


async def retention(rt: Runtime, holder: str) -> None:
    await run_leased(rt, holder, "retention", 60.0, _retention_step)


JOBS: list[Job] = [retention]

# Inventory: releases expired reservation holds.
JOBS.append(_inventory_sweeper)


async def _watch_hub(rt: Runtime, holder: str) -> None:
    from server.watch_hub import run_hub

    await run_hub(rt, holder)


# The per-process outbox tail behind WatchStockChanges and WatchOrderEvents.
JOBS.append(_watch_hub)


async def _refund_reconcile_step(rt: Runtime) -> int:
    if not rt.settings.temporal_address:
        return 0
    return await refunds.reconcile(rt.sessions, await rt.temporal(), rt.settings.temporal_task_queue)


async def _refund_reconciler(rt: Runtime, holder: str) -> None:
    await run_leased(rt, holder, "refund-reconciler", 10.0, _refund_reconcile_step)


# Refunds: starts executions an approval committed but never started.
JOBS.append(_refund_reconciler)


async def _registration_reconcile_step(rt: Runtime) -> int:
    if not rt.settings.temporal_address:
        return 0
    return await registration_starter.reconcile(
        rt.sessions, await rt.temporal(), rt.settings.temporal_task_queue
    )


async def _registration_reconciler(rt: Runtime, holder: str) -> None:
    await run_leased(rt, holder, "registration-reconciler", 10.0, _registration_reconcile_step)


# Registration: starts workflows a SubmitRegistration committed but never started.
JOBS.append(_registration_reconciler)


async def _stock_audit_step(rt: Runtime) -> int:
    counts = dict.fromkeys(inventory.DRIFT_KINDS, 0)
    async for page in inventory.audit_all(rt.read):
        for drift in page.drifts:
            counts[drift.kind] += 1
    for kind, n in counts.items():
        STOCK_DRIFT.labels(kind).set(n)
    if any(counts.values()):
        log.warning("stock drift found: run `entrepot audit` for the details", extra={"drifts": counts})
    return sum(counts.values())


async def _stock_audit(rt: Runtime, holder: str) -> None:
    if rt.settings.stock_audit_seconds > 0:
        await run_leased(rt, holder, "stock-audit", rt.settings.stock_audit_seconds, _stock_audit_step)


# Inventory: audits every stock level and exports entrepot_stock_drift per kind.
JOBS.append(_stock_audit)
