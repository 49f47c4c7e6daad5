"""Background jobs the server runs next to the RPCs (singletons across replicas via leases
or advisory locks). Each job is `async def job(rt, holder) -> None` that loops until
cancelled; they all live here and App.start() runs every one in JOBS.
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
from server.runtime import Runtime
from server.stock_watch import run_hub

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


async def retention(rt: Runtime, holder: str) -> None:
    """Deletes idempotency keys and outbox events past their retention."""
    await run_leased(rt, holder, "retention", 60.0, _retention_step)


async def reservation_expiry(rt: Runtime, holder: str) -> None:
    """Inventory: releases expired reservation holds; one replica at a time through a
    transaction-scoped advisory lock."""
    await inventory.run_sweeper(rt.sessions, asyncio.Event(), interval=rt.settings.reservation_sweep_seconds)


async def stock_watch_hub(rt: Runtime, holder: str) -> None:
    """Inventory streams: the per-process outbox tail behind WatchStockChanges."""
    await run_hub(rt, holder)


async def _refund_reconcile_step(rt: Runtime) -> int:
    if not rt.settings.temporal_address:
        return 0
    return await refunds.reconcile(rt.sessions, await rt.temporal(), rt.settings.temporal_task_queue)


async def refund_reconciler(rt: Runtime, holder: str) -> None:
    """Refunds: starts executions an approval committed but never started."""
    await run_leased(rt, holder, "refund-reconciler", 10.0, _refund_reconcile_step)


async def _registration_reconcile_step(rt: Runtime) -> int:
    if not rt.settings.temporal_address:
        return 0
    return await registration_starter.reconcile(
        rt.sessions, await rt.temporal(), rt.settings.temporal_task_queue
    )


async def registration_reconciler(rt: Runtime, holder: str) -> None:
    """Registration: starts the workflows of registrations a commit left without one."""
    await run_leased(rt, holder, "registration-reconciler", 10.0, _registration_reconcile_step)


JOBS: list[Job] = [retention, reservation_expiry, stock_watch_hub, refund_reconciler, registration_reconciler]
