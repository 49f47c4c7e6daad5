"""Background jobs the server runs next to the RPCs (singletons across replicas via leases
or advisory locks). Every job lives here, in JOBS: each is `async def job(rt, holder) -> None`
that loops until cancelled. Servicers never import this module (import-linter).
"""

from __future__ import annotations

import asyncio
import contextlib
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
    rt: Runtime,
    holder: str,
    name: str,
    every: float,
    step: Callable[[Runtime], Awaitable[int]],
    *,
    lease_seconds: float | None = None,
    wake: asyncio.Event | None = None,
    quiet: bool = False,
) -> None:
    """Run `step` every `every` seconds while this replica holds lease `name` (held for
    `lease_seconds`, by default max(3 * every, 5): a holder that died is replaced that
    long after its last renewal). `wake`: also run as soon as it is set, unless the
    last step failed. `quiet`: do not log each step's count."""
    ttl = timedelta(seconds=lease_seconds or max(every * 3, 5))
    while True:
        failed = False
        try:
            async with rt.uow() as uow:
                mine = await leases.try_acquire(uow.session, name, holder, ttl)
                await uow.commit()
            if mine:
                done = await step(rt)
                if done and not quiet:
                    log.info("background step", extra={"job": name, "rows": done})
        except asyncio.CancelledError:
            raise
        except Exception:
            # A database outage must not kill the loop; it retries on the next tick.
            log.warning("background job failed; retrying", exc_info=True, extra={"job": name})
            failed = True
        if wake is None or failed:
            await asyncio.sleep(every)
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await wake.wait()
            wake.clear()


# Rows per table per retention transaction, and the time one tick may spend draining.
RETENTION_BATCH = 10_000
RETENTION_BUDGET_SECONDS = 20.0


async def _retention_step(rt: Runtime, budget: float = RETENTION_BUDGET_SECONDS) -> int:
    """Deletes expired idempotency keys and outbox events in batches, one short
    transaction each, until none is left or the tick's budget is spent. One batch a
    minute would fall behind anything writing over ~170 events/s."""
    s = rt.settings
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    total = 0
    while True:
        async with rt.uow() as uow:
            keys = await idempotency.purge_older_than(
                uow.session, timedelta(hours=s.idempotency_retention_hours), RETENTION_BATCH
            )
            events = await outbox.purge_older_than(
                uow.session, timedelta(hours=s.outbox_retention_hours), RETENTION_BATCH
            )
            await uow.commit()
        total += keys + events
        if max(keys, events) < RETENTION_BATCH or loop.time() >= deadline:
            return total


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


async def _event_relay(rt: Runtime, holder: str) -> None:
    """Publishes every outbox event to the broker (server/relay.py), one replica at a time;
    only when a broker is configured (NATS_URL)."""
    from domain.platform.relay import lease_name
    from server.relay import Relay, make_sink
    from server.watch_hub import hub_for

    sink = make_sink(rt.settings)
    if sink is None:
        return
    s = rt.settings
    relay = Relay(rt, holder, sink)
    try:
        await run_leased(
            rt,
            holder,
            lease_name(sink.name),
            s.relay_poll_seconds,
            relay.step,
            lease_seconds=s.relay_lease_seconds,
            wake=hub_for(rt).wake_event(),
            quiet=True,
        )
    finally:
        await relay.close()


# Events: the outbox relayed to a message broker (NATS JetStream), exactly once.
JOBS.append(_event_relay)


async def _stock_audit_step(rt: Runtime) -> int:
    """Audit every level, moving the ledger checkpoints along (each page commits)."""
    counts = dict.fromkeys(inventory.DRIFT_KINDS, 0)
    full_after = timedelta(seconds=rt.settings.stock_audit_full_seconds)
    async for page in inventory.checkpointing_audit(rt.sessions, full_after=full_after):
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
