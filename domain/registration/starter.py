"""Registrations whose workflow never started.

SubmitRegistration commits, then starts RegistrationWorkflow (id derived from
the registration). If the process dies in between, or Temporal is unreachable
at that moment, the registration would stay `submitted` forever: the
workflow's first step is what moves every registration on (to
documents_pending or in_review). The reconciler (a leased background job)
re-issues the same start for registrations still `submitted` a while after
their last change; a start that finds the workflow running is a no-op.
"""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client
from temporalio.exceptions import WorkflowAlreadyStartedError

from domain.registration.store import registrations as store
from domain.registration.submissions import registration_workflow_id
from domain.registration.workflows import RegistrationInput, RegistrationWorkflow

log = logging.getLogger("entrepot.registration")

RECONCILE_AFTER_SECONDS = 30.0


async def start_registration(client: Client, task_queue: str, registration_id: str, expires_at: str) -> bool:
    """Starts the registration's workflow; False when it is already running."""
    try:
        await client.start_workflow(
            RegistrationWorkflow.run,
            RegistrationInput(registration_id, expires_at),
            id=registration_workflow_id(registration_id),
            task_queue=task_queue,
        )
    except WorkflowAlreadyStartedError:
        return False
    return True


async def reconcile(
    sessions: async_sessionmaker[AsyncSession],
    client: Client,
    task_queue: str,
    older_than_seconds: float = RECONCILE_AFTER_SECONDS,
    limit: int = 100,
) -> int:
    """Starts the missing workflows of registrations left `submitted`; returns how many started."""
    async with sessions() as s, s.begin():
        rows = await store.stranded(s, older_than_seconds, limit)
    started = 0
    for registration_id, expires_at in rows:
        if await start_registration(client, task_queue, registration_id, expires_at.isoformat()):
            log.warning(
                "registration was missing its workflow; started", extra={"registration_id": registration_id}
            )
            started += 1
    return started
