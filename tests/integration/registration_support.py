"""Local fixtures for registration tests below the gRPC layer: a fresh
database with every migration and a channel, document type and agreement."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import migrations
from domain.registration import catalog, submissions
from domain.registration.rules import Address
from domain.shared.caller import Caller
from domain.shared.db import make_engine, make_session_factory
from domain.shared.uow import UnitOfWork
from tests import pg

CH = "regdb"
APPLICANT = Caller("bff", frozenset({"registration.submit"}), frozenset({"*"}))


def dt_values(max_size: int) -> dict[str, Any]:
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


@pytest.fixture(scope="module")
def reg_db_url() -> Iterator[str]:
    url, name = pg.create_database("entrepot_regdb")
    migrations.upgrade(url)
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
        await catalog.create_document_type(uow.session, code="license", values=dt_values(max_size=1000))
        await catalog.publish_agreement(
            uow.session, code="terms", title="Terms", body="You agree.", signature_required=True, create=True
        )
        await uow.commit()
    yield sessions
    await engine.dispose()


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


async def make_form(sessions: async_sessionmaker[AsyncSession], slug: str, **kw: Any) -> catalog.Form:
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
            expire_after_seconds=kw.get("expire_after_seconds", 3600),
            active=True,
        )
        await uow.commit()
    return form


def answers(country: str = "FR") -> dict[str, Any]:
    return {"company": "Acme", "addr": {"line1": "1 rue", "city": "Paris", "country_code": country}}


async def submit(
    sessions: async_sessionmaker[AsyncSession], form: str, code: str = ""
) -> submissions.Registration:
    async with UnitOfWork(sessions) as uow:
        reg = await submissions.submit(
            uow.session,
            channel=CH,
            caller=APPLICANT,
            form_ref=form,
            answers=answers(),
            address=Address(),
            invitation_code=code,
        )
        await uow.commit()
    return reg
