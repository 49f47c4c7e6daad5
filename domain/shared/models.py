"""Tables of the shared kernel, in the `platform` schema: the outbox (the idempotency
store is reached only through domain/platform/idempotency.py's statements)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Index, Text, func, text
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
