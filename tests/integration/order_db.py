"""A migrated database and a session factory for DB-level order tests (no server)."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import pytest_asyncio
from alembic import command
from alembic.config import Config
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.shared.db import make_engine, make_session_factory
from tests import pg


def migrate(url: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(pg.ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url)
    try:
        command.upgrade(cfg, "heads")
    except ProgrammingError:
        # The skeleton's env.py sends multi-statement SQL through a prepared
        # statement, which asyncpg refuses; until main's framework fixes it,
        # apply the two migrations these tests need with plain asyncpg.
        asyncio.run(_apply_directly(url, ["platform_0001_initial", "order_0001_initial"]))


class _CollectOp:
    def __init__(self) -> None:
        self.sql: list[str] = []

    def execute(self, sql: str) -> None:
        self.sql.append(sql)


async def _apply_directly(url: str, names: list[str]) -> None:
    conn = await asyncpg.connect(url)
    try:
        for name in names:
            module = importlib.import_module(f"migrations.versions.{name}")
            collect = _CollectOp()
            module.op = collect
            module.upgrade()
            async with conn.transaction():
                for sql in collect.sql:
                    await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def order_db_url() -> Iterator[str]:
    url, name = pg.create_database("entrepot_order")
    try:
        migrate(url)
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
