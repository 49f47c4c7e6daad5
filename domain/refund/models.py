"""Tables of the refund module (schema `refunds`); private to domain.refund.

The module mostly uses hand-written SQL (conditional state changes); these
declarations document the schema and give the ORM a view of it.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, Boolean, DateTime, Integer, Text, func
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from domain.shared.db import Base

SCHEMA = {"schema": "refunds"}


class RefundRow(Base):
    __tablename__ = "refunds"
    __table_args__ = (SCHEMA,)

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    channel: Mapped[str] = mapped_column(Text)
    order_id: Mapped[str] = mapped_column(Text)
    customer_ref: Mapped[str] = mapped_column(Text, default="")
    order_submitted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    currency: Mapped[str] = mapped_column(Text)
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(Text)
    restock: Mapped[bool] = mapped_column(Boolean, default=False)
    restock_warehouse_code: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[str] = mapped_column(Text)
    requested_by: Mapped[str] = mapped_column(Text)
    decided_by: Mapped[str] = mapped_column(Text, default="")
    decision_note: Mapped[str] = mapped_column(Text, default="")
    execution_attempt: Mapped[int] = mapped_column(Integer, default=0)
    fault_message: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RefundLineRow(Base):
    __tablename__ = "refund_lines"
    __table_args__ = (SCHEMA,)

    refund_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    line_id: Mapped[str] = mapped_column(Text, primary_key=True)
    sku: Mapped[str] = mapped_column(Text)
    quantity: Mapped[int] = mapped_column(BigInteger)
    amount_minor: Mapped[int] = mapped_column(BigInteger)


class RefundTenderRow(Base):
    __tablename__ = "refund_tenders"
    __table_args__ = (SCHEMA,)

    refund_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    tender_id: Mapped[str] = mapped_column(Text, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(Text, default="")
    gateway_reference: Mapped[str] = mapped_column(Text, default="")
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(Text)
    idempotency_key: Mapped[str] = mapped_column(Text, unique=True)
    gateway_refund_id: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    refunded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RefundStepRow(Base):
    __tablename__ = "refund_steps"
    __table_args__ = (SCHEMA,)

    refund_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    step: Mapped[str] = mapped_column(Text, primary_key=True)
    done_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class WorkflowFaultRow(Base):
    __tablename__ = "workflow_faults"
    __table_args__ = (SCHEMA,)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(Text)
    workflow_id: Mapped[str] = mapped_column(Text)
    subject_type: Mapped[str] = mapped_column(Text)
    subject_id: Mapped[str] = mapped_column(Text)
    step: Mapped[str] = mapped_column(Text)
    error_type: Mapped[str] = mapped_column(Text)
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SimPspRefundRow(Base):
    __tablename__ = "sim_psp_refunds"
    __table_args__ = (SCHEMA,)

    idempotency_key: Mapped[str] = mapped_column(Text, primary_key=True)
    psp_refund_id: Mapped[str] = mapped_column(Text, unique=True)
    gateway_reference: Mapped[str] = mapped_column(Text)
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class SimPspRuleRow(Base):
    __tablename__ = "sim_psp_rules"
    __table_args__ = (SCHEMA,)

    gateway_reference: Mapped[str] = mapped_column(Text, primary_key=True)
    fail_times: Mapped[int] = mapped_column(Integer, default=0)
    fail_forever: Mapped[bool] = mapped_column(Boolean, default=False)
    timeout_after_charge_times: Mapped[int] = mapped_column(Integer, default=0)
    timeout_seconds: Mapped[float] = mapped_column(default=1.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
