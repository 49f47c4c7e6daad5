"""Registration domain against real PostgreSQL (no gRPC): SQL, atomic
redemption, lifecycle steps and their idempotency."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.registration import catalog, submissions
from domain.registration.storage import PostgresDocumentStorage
from domain.registration.strategies import BuiltinESignature
from domain.shared.caller import Caller
from domain.shared.errors import DomainError
from domain.shared.uow import UnitOfWork
from tests.integration.registration_support import CH, make_form, reg_db_url, reg_sessions, submit

REVIEWER = Caller("reviewer-1", frozenset({"registration.review"}), frozenset({"*"}))
__all__ = ["reg_db_url", "reg_sessions"]  # fixtures


async def test_redemption_is_atomic_under_concurrency(reg_sessions: async_sessionmaker[AsyncSession]) -> None:
    form = await make_form(reg_sessions, "invite-only", invitation_required=True)
    async with UnitOfWork(reg_sessions) as uow:
        await catalog.create_invitation_code(
            uow.session,
            channel=CH,
            code="FIVE-USES",
            form_id=form.id,
            customer_group="vip",
            max_uses=5,
            expires_at=None,
            active=True,
        )
        await uow.commit()
    results = await asyncio.gather(
        *(submit(reg_sessions, form.slug, "FIVE-USES") for _ in range(30)), return_exceptions=True
    )
    ok = [r for r in results if isinstance(r, submissions.Registration)]
    errors = [r for r in results if not isinstance(r, submissions.Registration)]
    assert len(ok) == 5
    assert all(isinstance(e, DomainError) and e.reason == "INVITATION_CODE_EXHAUSTED" for e in errors)
    assert all(r.customer_group == "vip" for r in ok)
    async with UnitOfWork(reg_sessions) as uow:
        code = await catalog.get_invitation_code(uow.session, channel=CH, code="FIVE-USES")
        redemptions = (
            await uow.session.execute(text("SELECT count(*) FROM registration.invitation_redemptions"))
        ).scalar_one()
    assert code.uses == 5 and redemptions == 5


async def test_lifecycle_steps_are_idempotent(reg_sessions: async_sessionmaker[AsyncSession]) -> None:
    form = await make_form(reg_sessions, "plain")
    async with UnitOfWork(reg_sessions) as uow:
        await catalog.create_rule(
            uow.session,
            channel=CH,
            name="FR needs license and terms",
            type="require",
            geo={"countries": ["FR"]},
            requirements={"requirements": [{"document_type_code": "license"}, {"agreement_code": "terms"}]},
            reason="",
            priority=0,
            form_id="",
            active=True,
        )
        await uow.commit()
    reg = await submit(reg_sessions, form.slug)
    assert reg.state == "submitted" and reg.account is not None and reg.account.status == "pending"
    assert reg.account.company_name == "Acme"
    async with UnitOfWork(reg_sessions) as uow:
        reg = await submissions.advance(uow.session, reg.id)
        reg = await submissions.advance(uow.session, reg.id)
        await uow.commit()
    assert reg.state == "documents_pending" and not reg.satisfied
    async with UnitOfWork(reg_sessions) as uow:
        with pytest.raises(DomainError) as exc:
            await submissions.review(
                uow.session, channel=CH, caller=REVIEWER, registration_id=reg.id, decision="approve", note=""
            )
        assert exc.value.reason == "REQUIREMENTS_NOT_MET"
    async with UnitOfWork(reg_sessions) as uow:
        await submissions.store_document(
            uow.session,
            PostgresDocumentStorage(),
            channel=CH,
            registration_id=reg.id,
            document_type_code="license",
            filename="l.pdf",
            content_type="application/pdf",
            content=b"%PDF-1",
            sha256="x",
            number="",
            issuing_authority="",
            expiration_date="",
        )
        sig = await submissions.sign_agreement(
            uow.session,
            BuiltinESignature(),
            channel=CH,
            registration_id=reg.id,
            agreement_code="terms",
            agreement_version=0,
            method="typed",
            signer_name="Ann",
            signer_email="",
            signature=b"Ann",
            external_reference="",
            ip_address="127.0.0.1",
            user_agent="ua",
        )
        await uow.commit()
    assert len(sig.content_sha256) == 64 and sig.agreement_version == 1
    async with UnitOfWork(reg_sessions) as uow:
        reg = await submissions.advance(uow.session, reg.id)
        assert reg.state == "in_review"
        await submissions.review(
            uow.session, channel=CH, caller=REVIEWER, registration_id=reg.id, decision="approve", note="ok"
        )
        first = await submissions.apply_decision(uow.session, reg.id)
        again = await submissions.apply_decision(uow.session, reg.id)
        expired = await submissions.expire(uow.session, reg.id)
        assert await submissions.notify(uow.session, reg.id, "wf:notify", "registration.notification")
        assert not await submissions.notify(uow.session, reg.id, "wf:notify", "registration.notification")
        await uow.commit()
    assert first.state == again.state == expired.state == "approved"
    async with UnitOfWork(reg_sessions) as uow:
        full = await submissions.get_registration(uow.session, channel=CH, registration_id=reg.id)
    assert full.account is not None and full.account.status == "active"
    assert [(h.from_state, h.to_state) for h in full.history] == [
        ("", "submitted"),
        ("submitted", "documents_pending"),
        ("documents_pending", "in_review"),
        ("in_review", "approved"),
    ]
    assert full.history[-1].actor == "reviewer-1"
