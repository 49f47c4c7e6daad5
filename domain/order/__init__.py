"""Orders: the public interface other modules (carts, refunds) and the servicer use.

Every function takes the caller's AsyncSession, so a cart checkout or a
refund can create or change an order inside its own transaction. Nothing
here commits. Other modules must not import domain.order.models.

Layout: types.py (read models, event topics), rules.py (pure decisions),
store/ (every statement), and
one module per concern that loads, decides with the rules, saves and emits:
intents.py (SubmitOrderIntent), queries.py, history.py (status entries),
lifecycle.py (transitions, shipments), refunds.py (refund records),
reissue.py (ReissueOrder), handoff.py (AcknowledgeOrderHandoff), audit.py
(`entrepot orders verify`), with reserving.py for the inventory reservation
intents, reissues and lifecycle make, and inventory_risk.py keeping
`inventory_risk` true to what inventory does to an order's reservation.

Data access: SQLAlchemy (ORM queries, Core inserts and updates) over
models.py, except the statements writing status entries and their events
(store/entries.py, SubmitOrderIntent's among them), which run on the session's
asyncpg connection (domain.shared.db.driver_connection) in the same transaction.
"""

from domain.order import inventory_risk
from domain.order.audit import AuditPage, Difference, audit_page
from domain.order.handoff import acknowledge_handoff
from domain.order.history import (
    append_status,
    close_status,
    list_status_history,
    record_manual_adjustment,
    status_summary,
)
from domain.order.intents import submit_intent
from domain.order.inventory_port import (
    DEFAULT_INVENTORY,
    InventoryPort,
    PendingReservation,
    Reserved,
    StockLine,
)
from domain.order.lifecycle import ship_items, shipment_status, transition
from domain.order.queries import get_order, get_order_by_external_id, list_orders
from domain.order.refunds import list_refunds, record_refund
from domain.order.reissue import REISSUE_SOURCE, reissue_order
from domain.order.rules import (
    Intent,
    LineIn,
    PaymentIn,
    Severity,
    State,
    StatusIn,
    TotalsIn,
    canonical_content,
    content_hash,
    differing_fields,
    intent_of_content,
    parse_payload,
)
from domain.order.types import (
    CREATED,
    STATUS_APPENDED,
    STATUS_CLOSED,
    TOPICS,
    TRANSITIONED,
    Line,
    Order,
    OrderFilter,
    RefundRecord,
    Shipment,
    ShipmentStatus,
    StatusEntry,
    StatusSummary,
    SubmitResult,
    Tender,
    Totals,
    entry_from_payload,
)

# Inventory tells orders, in its transaction, what their reservations hold now.
inventory_risk.observe_inventory()

# Names the refund module reads: an order's lines (with shipped and refunded
# quantities) and its tenders (captured and refunded amounts) are on `Order`
# from get_order(session, order_id, channel=...); record_refund writes.
__all__ = [
    "CREATED",
    "DEFAULT_INVENTORY",
    "REISSUE_SOURCE",
    "STATUS_APPENDED",
    "STATUS_CLOSED",
    "TOPICS",
    "TRANSITIONED",
    "AuditPage",
    "Difference",
    "Intent",
    "InventoryPort",
    "Line",
    "LineIn",
    "Order",
    "OrderFilter",
    "PaymentIn",
    "PendingReservation",
    "RefundRecord",
    "Reserved",
    "Severity",
    "Shipment",
    "ShipmentStatus",
    "State",
    "StatusEntry",
    "StatusIn",
    "StatusSummary",
    "StockLine",
    "SubmitResult",
    "Tender",
    "Totals",
    "TotalsIn",
    "acknowledge_handoff",
    "append_status",
    "audit_page",
    "canonical_content",
    "close_status",
    "content_hash",
    "differing_fields",
    "entry_from_payload",
    "get_order",
    "get_order_by_external_id",
    "intent_of_content",
    "list_orders",
    "list_refunds",
    "list_status_history",
    "parse_payload",
    "record_manual_adjustment",
    "record_refund",
    "reissue_order",
    "ship_items",
    "shipment_status",
    "status_summary",
    "submit_intent",
    "transition",
]
