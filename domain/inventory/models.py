"""Tables of the inventory module (schema `inventory`). Private to the module:
other modules use the functions exported by domain/inventory/__init__.py."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, Integer, Text, Uuid, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from domain.shared.db import Base


class WarehouseRow(Base):
    __tablename__ = "warehouses"
    __table_args__ = ({"schema": "inventory"},)

    code: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    address: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    contact: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class ItemRow(Base):
    __tablename__ = "items"
    __table_args__ = ({"schema": "inventory"},)

    sku: Mapped[str] = mapped_column(Text, primary_key=True)
    track_inventory: Mapped[bool] = mapped_column(Boolean, default=True)
    allow_backorder: Mapped[bool] = mapped_column(Boolean, default=False)
    max_backorder: Mapped[int] = mapped_column(BigInteger, default=0)
    low_stock_threshold: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class StockLevelRow(Base):
    __tablename__ = "stock_levels"
    __table_args__ = ({"schema": "inventory"},)

    sku: Mapped[str] = mapped_column(Text, primary_key=True)
    warehouse_code: Mapped[str] = mapped_column(Text, primary_key=True)
    on_hand: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class LedgerRow(Base):
    __tablename__ = "ledger"
    __table_args__ = ({"schema": "inventory"},)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    sku: Mapped[str] = mapped_column(Text)
    warehouse_code: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(Text)
    on_hand_before: Mapped[int] = mapped_column(BigInteger)
    on_hand_after: Mapped[int] = mapped_column(BigInteger)
    reserved_before: Mapped[int] = mapped_column(BigInteger)
    reserved_after: Mapped[int] = mapped_column(BigInteger)
    on_hand_delta: Mapped[int] = mapped_column(BigInteger)
    reserved_delta: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(Text)
    reference: Mapped[str] = mapped_column(Text)
    reservation_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    cost_minor: Mapped[int | None] = mapped_column(BigInteger)
    cost_currency: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ReservationRow(Base):
    __tablename__ = "reservations"
    __table_args__ = ({"schema": "inventory"},)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    reference: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ReservationLineRow(Base):
    __tablename__ = "reservation_lines"
    __table_args__ = ({"schema": "inventory"},)

    reservation_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    line_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    sku: Mapped[str] = mapped_column(Text)
    warehouse_code: Mapped[str] = mapped_column(Text)
    tracked: Mapped[bool] = mapped_column(Boolean)
    quantity: Mapped[int] = mapped_column(BigInteger)
    backordered: Mapped[int] = mapped_column(BigInteger)
    fulfilled: Mapped[int] = mapped_column(BigInteger)
    released: Mapped[int] = mapped_column(BigInteger)
