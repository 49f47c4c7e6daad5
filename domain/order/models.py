"""Tables of the order module (schema `orders`); private to domain.order.

The migration (order_0001) also installs triggers that make lines, money,
the intent, shipments and refunds immutable and the history append-only.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, ForeignKey, Integer, LargeBinary, Text, func
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from domain.shared.db import Base

SCHEMA = {"schema": "orders"}


class OrderRow(Base):
    __tablename__ = "orders"
    __table_args__ = (SCHEMA,)

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    channel: Mapped[str] = mapped_column(Text)
    source_system: Mapped[str] = mapped_column(Text)
    intent_id: Mapped[str] = mapped_column(Text)
    external_order_id: Mapped[str] = mapped_column(Text, default="")
    customer_ref: Mapped[str] = mapped_column(Text, default="")
    currency: Mapped[str] = mapped_column(Text)
    subtotal_minor: Mapped[int] = mapped_column(BigInteger)
    tax_minor: Mapped[int] = mapped_column(BigInteger)
    shipping_minor: Mapped[int] = mapped_column(BigInteger)
    discount_minor: Mapped[int] = mapped_column(BigInteger)
    grand_total_minor: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[bytes] = mapped_column(LargeBinary)
    content: Mapped[dict[str, Any]] = mapped_column(JSONB)
    reservation_id: Mapped[str | None] = mapped_column(Text)
    reissued_from_order_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    reissue_reason: Mapped[str] = mapped_column(Text, default="")
    external_handoff_reference: Mapped[str | None] = mapped_column(Text)
    external_handoff_acknowledged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    inventory_risk: Mapped[bool] = mapped_column(Boolean, default=False)
    submitted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class OrderLineRow(Base):
    __tablename__ = "order_lines"
    __table_args__ = (SCHEMA,)

    order_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("orders.orders.id"), primary_key=True
    )
    line_id: Mapped[str] = mapped_column(Text, primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    sku: Mapped[str] = mapped_column(Text)
    quantity: Mapped[int] = mapped_column(BigInteger)
    unit_price_minor: Mapped[int] = mapped_column(BigInteger)
    shipped_quantity: Mapped[int] = mapped_column(BigInteger, default=0)
    refunded_quantity: Mapped[int] = mapped_column(BigInteger, default=0)


class PaymentRow(Base):
    __tablename__ = "payments"
    __table_args__ = (SCHEMA,)

    order_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("orders.orders.id"), primary_key=True
    )
    tender_id: Mapped[str] = mapped_column(Text, primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(Text)
    captured_minor: Mapped[int] = mapped_column(BigInteger)
    gateway_reference: Mapped[str] = mapped_column(Text, default="")
    refunded_minor: Mapped[int] = mapped_column(BigInteger, default=0)


class StatusEntryRow(Base):
    __tablename__ = "status_entries"
    __table_args__ = (SCHEMA,)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    order_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("orders.orders.id"))
    code: Mapped[str] = mapped_column(Text)
    module: Mapped[str] = mapped_column(Text)
    category: Mapped[str] = mapped_column(Text, default="")
    severity: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    written_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    closed_by: Mapped[str | None] = mapped_column(Text)
    close_note: Mapped[str | None] = mapped_column(Text)


class ShipmentRow(Base):
    __tablename__ = "shipments"
    __table_args__ = (SCHEMA,)

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    order_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("orders.orders.id"))
    tracking_number: Mapped[str] = mapped_column(Text, default="")
    carrier: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ShipmentLineRow(Base):
    __tablename__ = "shipment_lines"
    __table_args__ = (SCHEMA,)

    shipment_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("orders.shipments.id"), primary_key=True
    )
    line_id: Mapped[str] = mapped_column(Text, primary_key=True)
    quantity: Mapped[int] = mapped_column(BigInteger)


class RefundRow(Base):
    __tablename__ = "refunds"
    __table_args__ = (SCHEMA,)

    order_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("orders.orders.id"), primary_key=True
    )
    refund_id: Mapped[str] = mapped_column(Text, primary_key=True)
    content_hash: Mapped[bytes] = mapped_column(LargeBinary)
    lines: Mapped[dict[str, Any]] = mapped_column(JSONB)
    amounts: Mapped[dict[str, Any]] = mapped_column(JSONB)
    recorded_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
