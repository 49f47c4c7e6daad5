"""The Temporal worker: every module's workflows and activities on one task queue.

Every module's workflows are in WORKFLOWS and its activity factory (it takes the
Runtime and returns the activity callables, bound methods of an object holding the
session factory) in ACTIVITY_FACTORIES, both here.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

import domain.refund as refunds
from domain import registration
from server.runtime import Runtime
from server.settings import Settings

log = logging.getLogger("entrepot.worker")


def refund_activities(rt: Runtime) -> Sequence[Callable[..., Any]]:
    return refunds.RefundActivities(rt.sessions, refunds.SimulatedGateway(rt.sessions)).all()


def registration_activities(rt: Runtime) -> Sequence[Callable[..., Any]]:
    return registration.RegistrationActivities(rt.sessions).all()


WORKFLOWS: list[type] = [refunds.RefundExecutionWorkflow, *registration.WORKFLOWS]
ACTIVITY_FACTORIES: list[Callable[[Runtime], Sequence[Callable[..., Any]]]] = [
    refund_activities,
    registration_activities,
]

# The sandbox re-imports a workflow's modules for every run; our domain packages
# (and the database libraries they import) are deterministic to import and
# heavy, so they are passed through: measured 0.2 -> ~5 refund workflows/s.
SANDBOX = SandboxedWorkflowRunner(
    restrictions=SandboxRestrictions.default.with_passthrough_modules(
        "domain", "sqlalchemy", "asyncpg", "pydantic", "pydantic_core", "google.protobuf"
    )
)


def build_worker(client: Client, rt: Runtime, task_queue: str) -> Worker | None:
    """None while no module has registered workflows or activities."""
    activities = [a for factory in ACTIVITY_FACTORIES for a in factory(rt)]
    if not WORKFLOWS and not activities:
        return None
    return Worker(
        client, task_queue=task_queue, workflows=WORKFLOWS, activities=activities, workflow_runner=SANDBOX
    )


async def run_worker(settings: Settings) -> None:
    rt = Runtime(settings)
    client = await rt.temporal()
    worker = build_worker(client, rt, settings.temporal_task_queue)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if worker is None:
        log.warning("no workflows or activities registered; worker idle")
        await stop.wait()
    else:
        async with worker:
            log.info("worker running", extra={"task_queue": settings.temporal_task_queue})
            await stop.wait()
            log.info("worker draining")
    await rt.close()
