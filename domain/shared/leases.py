"""Leases for singleton background jobs when several replicas run.

A job runs only while its holder owns the lease row; the lease expires on its
own if the holder dies, so another replica takes over.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

_ACQUIRE = text(
    """
    INSERT INTO platform.leases (name, holder, expires_at)
    VALUES (:name, :holder, now() + make_interval(secs => :secs))
    ON CONFLICT (name) DO UPDATE
        SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
        WHERE platform.leases.holder = EXCLUDED.holder OR platform.leases.expires_at < now()
    RETURNING holder
    """
)


async def try_acquire(session: AsyncSession, name: str, holder: str, ttl: timedelta) -> bool:
    """Take or renew the lease; False when another holder owns it."""
    row = (
        await session.execute(_ACQUIRE, {"name": name, "holder": holder, "secs": ttl.total_seconds()})
    ).first()
    return row is not None
