"""Real PostgreSQL for tests: TEST_DATABASE_URL, or embedded PostgreSQL.

Every test session gets its own fresh database with all migrations applied,
so parallel runs (and several worktrees) never see each other's rows.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

ROOT = Path(__file__).resolve().parent.parent


def server_url() -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        return url
    from server.devservices import embedded_postgres_url

    return embedded_postgres_url(ROOT / ".entrepot" / "test-pg")


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(with_database(url, "postgres"))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_database(prefix: str = "entrepot_test") -> tuple[str, str]:
    """Returns (url of a new empty database, its name)."""
    base = server_url()
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(base, f'CREATE DATABASE "{name}"'))
    return with_database(base, name), name


def drop_database(name: str) -> None:
    asyncio.run(_admin(server_url(), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
