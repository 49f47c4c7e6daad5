"""The idempotency store every mutating RPC uses (AIP-155), keyed by (caller, request_id).

The claim row is inserted in the same transaction as the mutation, so a
response is stored if and only if the mutation committed. A concurrent call
with the same key blocks on the primary key until the first commits, then
reads the stored response.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from domain.shared.models import IdempotencyKey


@dataclass
class Claim:
    """A claim made by the mutation's own first statement instead of a statement
    of its own (Runtime.mutate_claiming): one round trip less on hot paths.

    That statement includes `claim_cte(first)` as its first CTE (named `claim`,
    one row when the key is ours) and makes every change conditional on
    `EXISTS (SELECT FROM claim)`, so a used key changes nothing; then it calls
    `made(owned)`. The INSERT ... ON CONFLICT waits for a concurrent holder of
    the key exactly like `claim()` does, before anything else is locked."""

    principal: str
    request_id: str
    method: str
    request_hash: bytes
    owned: bool | None = None

    def params(self) -> list[object]:
        return [self.principal, self.request_id, self.method, self.request_hash]

    def made(self, owned: bool) -> None:
        self.owned = owned
        if not owned:
            raise KeyTaken(self.request_id)


class KeyTaken(Exception):
    """The claim found the key used before: the caller answers with the stored response."""


def claim_cte(first: int) -> str:
    """The `claim` CTE, its four parameters numbered from `first` (Claim.params order)."""
    p, r, m, h = (f"${first + i}" for i in range(4))
    return f"""claim AS (
        INSERT INTO platform.idempotency_keys (principal, request_id, method, request_hash)
        VALUES ({p}, {r}, {m}, {h})
        ON CONFLICT (principal, request_id) DO NOTHING RETURNING true AS owned
    )"""


@dataclass(frozen=True)
class StoredResponse:
    method: str
    request_hash: bytes
    status_code: int | None
    response: bytes | None


async def claim(
    session: AsyncSession,
    principal: str,
    request_id: str,
    method: str,
    request_hash: bytes,
    *,
    status_code: int | None = None,
    response: bytes | None = None,
) -> bool:
    """True when this call owns the key (first use); False when it was used before."""
    row = (
        await session.execute(
            insert(IdempotencyKey)
            .values(
                principal=principal,
                request_id=request_id,
                method=method,
                request_hash=request_hash,
                status_code=status_code,
                response=response,
            )
            .on_conflict_do_nothing(index_elements=["principal", "request_id"])
            .returning(IdempotencyKey.request_id)
        )
    ).scalar_one_or_none()
    return row is not None


async def complete(
    session: AsyncSession, principal: str, request_id: str, status_code: int, response: bytes
) -> None:
    await session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.principal == principal, IdempotencyKey.request_id == request_id)
        .values(status_code=status_code, response=response)
    )


async def get(session: AsyncSession, principal: str, request_id: str) -> StoredResponse:
    row = (
        await session.execute(
            select(IdempotencyKey).where(
                IdempotencyKey.principal == principal, IdempotencyKey.request_id == request_id
            )
        )
    ).scalar_one()
    return StoredResponse(row.method, row.request_hash, row.status_code, row.response)


_PURGE = text(
    """
    DELETE FROM platform.idempotency_keys
    WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM platform.idempotency_keys
        WHERE created_at < now() - make_interval(secs => :secs) LIMIT :limit))
    """
)


async def purge_older_than(session: AsyncSession, age: timedelta, limit: int = 10_000) -> int:
    """Forget keys older than the retention; a retry after that is a new request."""
    result = await session.execute(_PURGE, {"secs": age.total_seconds(), "limit": limit})
    return int(getattr(result, "rowcount", 0) or 0)
