"""Registration domain against real PostgreSQL (no gRPC): SQL, atomic
redemption, lifecycle steps and their idempotency."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.registration import catalog, submissions
from domain.registration.rules import Address
from domain.registration.storage import PostgresDocumentStorage
from domain.registration.strategies import BuiltinESignature
from domain.shared.caller import Caller
from domain.shared.db import make_engine, make_session_factory
from domain.shared.errors import DomainError
from domain.shared.uow import UnitOfWork
from tests import pg

APPLICANT = Caller("bff", frozenset({"registration.submit"}), frozenset({"*"}))
REVIEWER = Caller("reviewer-1", frozenset({"registration.review"}), frozenset({"*"}))
CH = "regdb"


def _apply_platform_sql(url: str) -> None:
    """platform_0001 runs several statements in one op.execute, which asyncpg
    refuses through alembic here; run its SQL directly (simple protocol)."""
    import asyncpg
    from alembic import op

    from migrations.versions import platform_0001_initial as platform

    collected: list[str] = []
    original = op.execute
    op.execute = collected.append  # type: ignore[assignment]
    try:
        platform.upgrade()
    finally:
        op.execute = original  # type: ignore[assignment]

    async def run() -> None:
        conn = await asyncpg.connect(url)
        try:
            for sql in collected:
                await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(scope="module")
def reg_db_url() -> Iterator[str]:
    url, name = pg.create_database("entrepot_regdb")
    cfg = Config()
    cfg.set_main_option("script_location", str(pg.ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url)
    _apply_platform_sql(url)
    command.stamp(cfg, "platform_0001")
    command.upgrade(cfg, "heads")
    try:
        yield url
    finally:
        pg.drop_database(name)


@pytest.fixture(scope="module")
async def reg_sessions(reg_db_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = make_engine(reg_db_url, pool_size=20, max_overflow=40)
    sessions = make_session_factory(engine)
    async with UnitOfWork(sessions) as uow:
        await uow.session.execute(
            text(
                "INSERT INTO platform.channels (slug, name, currency, timezone) VALUES (:s, 'R', 'EUR', 'UTC')"
            ),
            {"s": CH},
        )
        await catalog.create_document_type(uow.session, code="license", values=_dt_values(max_size=1000))
        await catalog.publish_agreement(
            uow.session, code="terms", title="Terms", body="You agree.", signature_required=True, create=True
        )
        await uow.commit()
    yield sessions
    await engine.dispose()


def _dt_values(max_size: int) -> dict[str, Any]:
    return {
        "name": "License",
        "description": "",
        "allowed_content_types": ["application/pdf"],
        "max_size_bytes": max_size,
        "requires_expiration_date": False,
        "requires_number": False,
        "requires_issuing_authority": False,
        "active": True,
    }


STEPS = [
    {
        "key": "s",
        "sections": [
            {
                "key": "a",
                "fields": [
                    {
                        "key": "company",
                        "type": "FIELD_TYPE_TEXT",
                        "required": True,
                        "maps_to": {"target": "TARGET_ACCOUNT", "path": "company_name"},
                    },
                    {"key": "addr", "type": "FIELD_TYPE_ADDRESS", "required": True},
                ],
            }
        ],
    }
]


async def _form(sessions: async_sessionmaker[AsyncSession], slug: str, **kw: Any) -> catalog.Form:
    async with UnitOfWork(sessions) as uow:
        form = await catalog.create_form(
            uow.session,
            channel=CH,
            slug=slug,
            name=slug,
            description="",
            customer_group="wholesale",
            invitation_required=kw.get("invitation_required", False),
            steps=STEPS,
            expire_after_seconds=3600,
            active=True,
        )
        await uow.commit()
    return form


def _answers(country: str = "FR") -> dict[str, Any]:
    return {"company": "Acme", "addr": {"line1": "1 rue", "city": "Paris", "country_code": country}}


async def _submit(
    sessions: async_sessionmaker[AsyncSession], form: str, code: str = ""
) -> submissions.Registration:
    async with UnitOfWork(sessions) as uow:
        reg = await submissions.submit(
            uow.session,
            channel=CH,
            caller=APPLICANT,
            form_ref=form,
            answers=_answers(),
            address=Address(),
            invitation_code=code,
        )
        await uow.commit()
    return reg


async def test_redemption_is_atomic_under_concurrency(reg_sessions: async_sessionmaker[AsyncSession]) -> None:
    form = await _form(reg_sessions, "invite-only", invitation_required=True)
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
        *(_submit(reg_sessions, form.slug, "FIVE-USES") for _ in range(30)), return_exceptions=True
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
    form = await _form(reg_sessions, "plain")
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
    reg = await _submit(reg_sessions, form.slug)
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
