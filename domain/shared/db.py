"""Async engine and session factory (SQLAlchemy 2 + asyncpg)."""

from __future__ import annotations

from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """One declarative base; each module's tables live in that module's schema."""

    metadata = MetaData(naming_convention=NAMING)


def async_url(url: str) -> str:
    """Accept plain postgresql:// URLs and use the asyncpg driver."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    raise ValueError("DATABASE_URL must be a postgresql:// URL")


def make_engine(
    url: str, *, pool_size: int = 10, max_overflow: int = 10, command_timeout: float = 30.0
) -> AsyncEngine:
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=max_overflow,
        # No pre-ping: it costs a round trip per checkout. A connection broken by a
        # database restart fails its call with UNAVAILABLE and SQLAlchemy then
        # invalidates the whole pool, so the next calls reconnect.
        pool_pre_ping=False,
        pool_timeout=10,
        connect_args={
            "command_timeout": command_timeout,
            "timeout": 5,
            "server_settings": {"application_name": "entrepot"},
        },
    )


def make_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)
