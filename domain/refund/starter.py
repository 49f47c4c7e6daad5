"""Starting executions safely against a commit race.

The servicer starts the workflow after its transaction commits, with an id
derived from (refund, execution attempt). A start that finds the workflow
already there is success. If the process dies between commit and start, the
refund sits EXECUTING without a workflow: the reconciler (a leased background
job) re-issues the same start for EXECUTING refunds idle for a while, so an
approved refund is never left behind.
"""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from domain.refund import store
from domain.refund.rules import workflow_id
from domain.refund.workflows import RefundExecutionInput, RefundExecutionWorkflow

log = logging.getLogger("entrepot.refund")

RECONCILE_AFTER_SECONDS = 30.0


async def start_execution(client: Client, task_queue: str, refund_id: str, attempt: int) -> bool:
    """Starts the execution of `attempt`; False when it was already started."""
    try:
        await client.start_workflow(
            RefundExecutionWorkflow.run,
            RefundExecutionInput(refund_id, attempt),
            id=workflow_id(refund_id, attempt),
            task_queue=task_queue,
            # A run that completed normally already moved the refund on; only a run
            # that failed or was terminated may be started again under its id.
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
        )
    except WorkflowAlreadyStartedError:
        return False
    return True


async def reconcile(
    sessions: async_sessionmaker[AsyncSession],
    client: Client,
    task_queue: str,
    older_than_seconds: float = RECONCILE_AFTER_SECONDS,
) -> int:
    """Re-issues the start of EXECUTING refunds idle for a while; returns how many started."""
    async with sessions() as s, s.begin():
        pending = await store.stale_executions(s, older_than_seconds, limit=100)
    started = 0
    for refund_id, attempt in pending:
        if await start_execution(client, task_queue, refund_id, attempt):
            log.warning("refund execution was missing its workflow; started", extra={"refund_id": refund_id})
            started += 1
    return started
