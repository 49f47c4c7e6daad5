"""Tables of the shared kernel, in the `platform` schema: outbox and idempotency."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Index, Integer, LargeBinary, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.types import UserDefinedType

from domain.shared.db import Base


class Xid8(UserDefinedType[int]):
    """PostgreSQL's 64-bit transaction id type."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "xid8"


class OutboxEvent(Base):
    """The event log. Watchers tail it in (txid, id) order: see domain/shared/outbox.py."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_txid_id", "txid", "id"),
        Index("ix_outbox_topic_txid_id", "topic", "txid", "id"),
        {"schema": "platform"},
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    # xid8 of the writing transaction; filled by the column default.
    txid: Mapped[int] = mapped_column(Xid8(), server_default=text("pg_current_xact_id()"))
    topic: Mapped[str] = mapped_column(Text)
    aggregate_type: Mapped[str] = mapped_column(Text)
    aggregate_id: Mapped[str] = mapped_column(Text)
    channel: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class IdempotencyKey(Base):
    """Stored response per (caller, request_id); see server/mutations.py."""

    __tablename__ = "idempotency_keys"
    __table_args__ = ({"schema": "platform"},)

    principal: Mapped[str] = mapped_column(Text, primary_key=True)
    request_id: Mapped[str] = mapped_column(Text, primary_key=True)
    method: Mapped[str] = mapped_column(Text)
    request_hash: Mapped[bytes] = mapped_column(LargeBinary)
    # 0 for OK, else the gRPC status code of the stored error.
    status_code: Mapped[int | None] = mapped_column(Integer)
    # Serialized response message (OK) or google.rpc.Status (error).
    response: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )
