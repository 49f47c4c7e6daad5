"""What the order module answers with: its read models, the topics of its
events and the reading of the status entry those events carry. No I/O here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from domain.order.rules import Severity, State
from domain.shared.money import Money

# Outbox topics (WatchOrderEvents tails these).
CREATED = "order.created"
TRANSITIONED = "order.transitioned"
STATUS_APPENDED = "order.status_appended"
STATUS_CLOSED = "order.status_closed"
TOPICS = (CREATED, TRANSITIONED, STATUS_APPENDED, STATUS_CLOSED)


@dataclass(frozen=True)
class Line:
    line_id: str
    sku: str
    quantity: int
    unit_price: Money
    shipped_quantity: int
    refunded_quantity: int

    @property
    def line_total(self) -> Money:
        return Money(self.unit_price.currency, self.unit_price.amount_minor * self.quantity)

    @property
    def remaining_quantity(self) -> int:
        return self.quantity - self.shipped_quantity


@dataclass(frozen=True)
class Tender:
    tender_id: str
    method: str
    captured: Money
    gateway_reference: str
    refunded: Money


@dataclass(frozen=True)
class Totals:
    subtotal: Money
    tax: Money
    shipping: Money
    discount: Money
    grand_total: Money


@dataclass(frozen=True)
class Order:
    id: str
    channel: str
    source_system: str
    intent_id: str
    external_order_id: str
    customer_ref: str
    currency: str
    state: State
    lines: tuple[Line, ...]
    totals: Totals
    payments: tuple[Tender, ...]
    submitted_at: datetime
    created_at: datetime
    updated_at: datetime
    reservation_id: str | None
    blocked: bool
    reissued_from_order_id: str = ""
    reissue_reason: str = ""
    # Orders reissued from this one, oldest first.
    reissue_order_ids: tuple[str, ...] = ()
    external_handoff_reference: str = ""
    external_handoff_acknowledged_at: datetime | None = None
    inventory_risk: bool = False

    @property
    def reissue(self) -> bool:
        return bool(self.reissued_from_order_id)

    @property
    def captured(self) -> Money:
        return Money(self.currency, sum(p.captured.amount_minor for p in self.payments))


@dataclass(frozen=True)
class SubmitResult:
    order: Order
    created: bool


@dataclass(frozen=True)
class StatusEntry:
    id: int
    order_id: str
    code: str
    module: str
    category: str
    severity: Severity
    payload: dict[str, Any]
    recorded_at: datetime
    written_by: str
    created_at: datetime
    closed_at: datetime | None
    closed_by: str | None
    close_note: str | None

    @property
    def open(self) -> bool:
        return self.closed_at is None


@dataclass(frozen=True)
class StatusSummary:
    order_id: str
    state: State
    latest_by_module: tuple[StatusEntry, ...]
    open_blocking: tuple[StatusEntry, ...]
    inventory_risk: bool = False


@dataclass(frozen=True)
class Shipment:
    id: str
    order_id: str
    lines: tuple[tuple[str, int], ...]
    tracking_number: str
    carrier: str
    created_at: datetime


@dataclass(frozen=True)
class ShipmentStatus:
    order_id: str
    state: State
    lines: tuple[Line, ...]
    shipments: tuple[Shipment, ...]


@dataclass(frozen=True)
class RefundRecord:
    order_id: str
    refund_id: str
    lines: dict[str, int]
    amounts: dict[str, int]
    created_at: datetime


@dataclass(frozen=True)
class OrderFilter:
    states: tuple[State, ...] = ()
    customer_ref: str = ""
    source_system: str = ""
    start: datetime | None = None
    end: datetime | None = None
    blocked_only: bool = False
    inventory_risk_only: bool = False
    # Only orders created at least this long ago whose handoff is not acknowledged.
    handoff_unacknowledged_for: timedelta | None = None


def entry_from_payload(d: Mapping[str, Any]) -> StatusEntry:
    """The entry an order status event carries (built by store/entries.py's _entry_events)."""
    return StatusEntry(
        id=int(d["id"]),
        order_id=str(d["order_id"]),
        code=str(d["code"]),
        module=str(d["module"]),
        category=str(d["category"]),
        severity=Severity(d["severity"]),
        payload=dict(d["payload"]),
        recorded_at=datetime.fromisoformat(d["recorded_at"]),
        written_by=str(d["written_by"]),
        created_at=datetime.fromisoformat(d["created_at"]),
        closed_at=datetime.fromisoformat(d["closed_at"]) if d.get("closed_at") else None,
        closed_by=d.get("closed_by"),
        close_note=d.get("close_note"),
    )
