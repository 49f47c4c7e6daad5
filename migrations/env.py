"""Alembic environment: async engine, one version table, one branch per module."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from domain.shared.db import make_engine

config = context.config


def _run(connection: Connection) -> None:
    context.configure(connection=connection, version_table_schema="public", transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


async def _main() -> None:
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "", pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_run)
            await conn.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `entrepot migrate`")
asyncio.run(_main())
