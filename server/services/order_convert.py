"""Proto <-> domain translation for OrderService, in one place."""

from __future__ import annotations

import json

import domain.order as orders
from domain.shared.money import Money
from domain.shared.outbox import StoredEvent
from entrepot.order.v1 import order_pb2 as pb
from entrepot.platform.v1 import types_pb2
from server.convert import from_ts_field, ts

STATE_TO_PB = {
    orders.State.PENDING: pb.Order.STATE_PENDING,
    orders.State.PROCESSING: pb.Order.STATE_PROCESSING,
    orders.State.PARTIALLY_SHIPPED: pb.Order.STATE_PARTIALLY_SHIPPED,
    orders.State.SHIPPED: pb.Order.STATE_SHIPPED,
    orders.State.DELIVERED: pb.Order.STATE_DELIVERED,
    orders.State.CANCELLED: pb.Order.STATE_CANCELLED,
}
STATE_FROM_PB = {v: k for k, v in STATE_TO_PB.items()}

SEVERITY_TO_PB = {
    orders.Severity.INFO: pb.SEVERITY_INFO,
    orders.Severity.WARNING: pb.SEVERITY_WARNING,
    orders.Severity.BLOCKING: pb.SEVERITY_BLOCKING,
}
SEVERITY_FROM_PB = {v: k for k, v in SEVERITY_TO_PB.items()}

EVENT_TOPICS = {
    pb.ORDER_EVENT_TYPE_CREATED: orders.CREATED,
    pb.ORDER_EVENT_TYPE_TRANSITIONED: orders.TRANSITIONED,
    pb.ORDER_EVENT_TYPE_STATUS_APPENDED: orders.STATUS_APPENDED,
    pb.ORDER_EVENT_TYPE_STATUS_CLOSED: orders.STATUS_CLOSED,
}
TOPIC_TYPES = {v: k for k, v in EVENT_TOPICS.items()}


def money_pb(m: Money) -> types_pb2.Money:
    return types_pb2.Money(currency_code=m.currency, amount_minor=m.amount_minor)


def money(m: types_pb2.Money) -> Money:
    return Money(m.currency_code, m.amount_minor)


def intent_from_pb(i: pb.OrderIntent) -> orders.Intent:
    t = i.totals
    return orders.Intent(
        intent_id=i.intent_id,
        source_system=i.source_system,
        external_order_id=i.external_order_id,
        customer_ref=i.customer_ref,
        lines=tuple(orders.LineIn(li.line_id, li.sku, li.quantity, money(li.unit_price)) for li in i.lines),
        totals=orders.TotalsIn(
            money(t.subtotal), money(t.tax), money(t.shipping), money(t.discount), money(t.grand_total)
        ),
        payments=tuple(
            orders.PaymentIn(p.tender_id, p.method, money(p.captured), p.gateway_reference)
            for p in i.payments
        ),
        submitted_at=from_ts_field(i, "submit_time", "intent.submit_time"),
    )


def order_pb(o: orders.Order) -> pb.Order:
    t = o.totals
    return pb.Order(
        id=o.id,
        channel=o.channel,
        source_system=o.source_system,
        intent_id=o.intent_id,
        external_order_id=o.external_order_id,
        customer_ref=o.customer_ref,
        state=STATE_TO_PB[o.state],
        lines=[
            pb.OrderLine(
                line_id=li.line_id,
                sku=li.sku,
                quantity=li.quantity,
                unit_price=money_pb(li.unit_price),
                line_total=money_pb(li.line_total),
                shipped_quantity=li.shipped_quantity,
                refunded_quantity=li.refunded_quantity,
            )
            for li in o.lines
        ],
        totals=pb.OrderTotals(
            subtotal=money_pb(t.subtotal),
            tax=money_pb(t.tax),
            shipping=money_pb(t.shipping),
            discount=money_pb(t.discount),
            grand_total=money_pb(t.grand_total),
        ),
        payments=[
            pb.Payment(
                tender_id=p.tender_id,
                method=p.method,
                captured=money_pb(p.captured),
                gateway_reference=p.gateway_reference,
                refunded=money_pb(p.refunded),
            )
            for p in o.payments
        ],
        submit_time=ts(o.submitted_at),
        create_time=ts(o.created_at),
        update_time=ts(o.updated_at),
        reservation_id=o.reservation_id or "",
        blocked=o.blocked,
        reissue=o.reissue,
        reissued_from_order_id=o.reissued_from_order_id,
        reissue_reason=o.reissue_reason,
        reissue_order_ids=o.reissue_order_ids,
        external_handoff_reference=o.external_handoff_reference,
        external_handoff_acknowledge_time=ts(o.external_handoff_acknowledged_at),
        inventory_risk=o.inventory_risk,
    )


def entry_pb(e: orders.StatusEntry) -> pb.OrderStatusEntry:
    return pb.OrderStatusEntry(
        id=e.id,
        order_id=e.order_id,
        code=e.code,
        module=e.module,
        category=e.category,
        severity=SEVERITY_TO_PB[e.severity],
        payload_json=json.dumps(e.payload, sort_keys=True, separators=(",", ":")),
        record_time=ts(e.recorded_at),
        written_by=e.written_by,
        create_time=ts(e.created_at),
        close_time=ts(e.closed_at),
        closed_by=e.closed_by or "",
        close_note=e.close_note or "",
        open=e.open,
    )


def status_in(e: pb.OrderStatusEntry) -> orders.StatusIn:
    return orders.StatusIn(
        code=e.code,
        severity=SEVERITY_FROM_PB.get(e.severity, orders.Severity.INFO),
        category=e.category,
        payload=orders.parse_payload(e.payload_json),
        recorded_at=from_ts_field(e, "record_time", "entry.record_time"),
    )


def shipment_pb(s: orders.Shipment) -> pb.Shipment:
    return pb.Shipment(
        id=s.id,
        order_id=s.order_id,
        lines=[pb.LineQuantity(line_id=lid, quantity=q) for lid, q in s.lines],
        tracking_number=s.tracking_number,
        carrier=s.carrier,
        create_time=ts(s.created_at),
    )


def shipment_status_pb(s: orders.ShipmentStatus) -> pb.ShipmentStatus:
    return pb.ShipmentStatus(
        order_id=s.order_id,
        state=STATE_TO_PB[s.state],
        lines=[
            pb.LineShipmentStatus(
                line_id=li.line_id,
                sku=li.sku,
                ordered_quantity=li.quantity,
                shipped_quantity=li.shipped_quantity,
                remaining_quantity=li.remaining_quantity,
            )
            for li in s.lines
        ],
        shipments=[shipment_pb(x) for x in s.shipments],
    )


def summary_pb(s: orders.StatusSummary) -> pb.OrderStatusSummary:
    return pb.OrderStatusSummary(
        order_id=s.order_id,
        state=STATE_TO_PB[s.state],
        latest_by_module=[entry_pb(e) for e in s.latest_by_module],
        open_blocking=[entry_pb(e) for e in s.open_blocking],
        inventory_risk=s.inventory_risk,
    )


def event_pb(e: StoredEvent) -> pb.OrderEvent:
    out = pb.OrderEvent(
        event_id=e.id,
        type=TOPIC_TYPES[e.topic],
        order_id=str(e.payload.get("order_id", e.aggregate_id)),
        time=ts(e.created_at),
    )
    if e.topic == orders.CREATED:
        out.state = STATE_TO_PB[orders.State(e.payload["state"])]
    elif e.topic == orders.TRANSITIONED:
        out.state = STATE_TO_PB[orders.State(e.payload["to"])]
        out.previous_state = STATE_TO_PB[orders.State(e.payload["from"])]
    else:
        out.entry.CopyFrom(entry_pb(orders.entry_from_payload(e.payload["entry"])))
    return out
