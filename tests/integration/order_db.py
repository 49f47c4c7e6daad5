"""A migrated database and a session factory for DB-level order tests (no server)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import migrations
from domain.shared.db import make_engine, make_session_factory
from tests import pg


@pytest.fixture(scope="module")
def order_db_url() -> Iterator[str]:
    url, name = pg.create_database("entrepot_order")
    try:
        migrations.upgrade(url)
        yield url
    finally:
        pg.drop_database(name)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def order_sessions(order_db_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = make_engine(order_db_url, pool_size=20, max_overflow=40)
    try:
        yield make_session_factory(engine)
    finally:
        await engine.dispose()
