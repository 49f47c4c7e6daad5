"""Where document content lives, behind one small interface.

The default keeps content in PostgreSQL (bytea) so every server replica and
every worker sees it, and a write joins the caller's transaction: when the
upload's transaction rolls back, no content is left behind. Another backend
(S3, a vault) implements the same three methods; such a backend ignores the
session and must delete on its own if the transaction fails.
"""

from __future__ import annotations

from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from domain.registration.store import registrations as store
from domain.shared.errors import NotFound


class DocumentStorage(Protocol):
    name: str

    async def put(self, session: AsyncSession, key: str, content: bytes, sha256: str) -> None: ...

    async def get(self, session: AsyncSession, key: str) -> bytes: ...

    async def delete(self, session: AsyncSession, key: str) -> None: ...


class PostgresDocumentStorage:
    name = "postgres"

    async def put(self, session: AsyncSession, key: str, content: bytes, sha256: str) -> None:
        await store.insert_blob(session, key, content, sha256)

    async def get(self, session: AsyncSession, key: str) -> bytes:
        content = await store.find_blob(session, key)
        if content is None:
            raise NotFound(
                "DOCUMENT_CONTENT_NOT_FOUND", "the document's content is not stored", metadata={"key": key}
            )
        return content

    async def delete(self, session: AsyncSession, key: str) -> None:
        await store.delete_blob(session, key)
