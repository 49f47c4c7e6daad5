"""Where document content lives, behind one small interface.

The default keeps content in PostgreSQL (bytea) so every server replica and
every worker sees it, and a write joins the caller's transaction: when the
upload's transaction rolls back, no content is left behind. Another backend
(S3, a vault) implements the same three methods; such a backend ignores the
session and must delete on its own if the transaction fails.
"""

from __future__ import annotations

from typing import Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from domain.shared.errors import NotFound


class DocumentStorage(Protocol):
    name: str

    async def put(self, session: AsyncSession, key: str, content: bytes, sha256: str) -> None: ...

    async def get(self, session: AsyncSession, key: str) -> bytes: ...

    async def delete(self, session: AsyncSession, key: str) -> None: ...


class PostgresDocumentStorage:
    name = "postgres"

    async def put(self, session: AsyncSession, key: str, content: bytes, sha256: str) -> None:
        await session.execute(
            text(
                "INSERT INTO registration.document_blobs (key, content, size_bytes, sha256) "
                "VALUES (:k, :c, :n, :h) ON CONFLICT (key) DO NOTHING"
            ),
            {"k": key, "c": content, "n": len(content), "h": sha256},
        )

    async def get(self, session: AsyncSession, key: str) -> bytes:
        row = (
            await session.execute(
                text("SELECT content FROM registration.document_blobs WHERE key = :k"), {"k": key}
            )
        ).scalar_one_or_none()
        if row is None:
            raise NotFound(
                "DOCUMENT_CONTENT_NOT_FOUND", "the document's content is not stored", metadata={"key": key}
            )
        return bytes(row)

    async def delete(self, session: AsyncSession, key: str) -> None:
        await session.execute(text("DELETE FROM registration.document_blobs WHERE key = :k"), {"k": key})
