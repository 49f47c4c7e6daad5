"""Pure rules of orders: intent validation, canonical content, lifecycle, status
codes, what may ship and what may be refunded.

No I/O here, so all of it is unit-tested without a database.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from domain.shared.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    PreconditionViolation,
    Violations,
)
from domain.shared.money import Money, is_currency

MAX_LINES = 500
MAX_PAYMENTS = 50
MAX_PAYLOAD_BYTES = 16 * 1024
# Generous but bounded: no single amount may overflow int64 when summed over 500 lines.
MAX_AMOUNT_MINOR = 10**15
MAX_QUANTITY = 10**9

ID_TEXT = re.compile(r"^[\x21-\x7e]{1,128}$")
SHORT_ID = re.compile(r"^[\x21-\x7e]{1,64}$")
CODE = re.compile(r"^([a-z][a-z0-9_]{0,31}):([a-z][a-z0-9_]{0,63})$")


class State(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    PARTIALLY_SHIPPED = "partially_shipped"
    SHIPPED = "shipped"
    DELIVERED = "delivered"
    CANCELLED = "cancelled"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    BLOCKING = "blocking"


# Moves TransitionOrder accepts. Shipping states are also reached through
# ShipOrderItems, which follows the same table.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.PENDING: frozenset({State.PROCESSING, State.CANCELLED}),
    State.PROCESSING: frozenset({State.PARTIALLY_SHIPPED, State.SHIPPED, State.CANCELLED}),
    State.PARTIALLY_SHIPPED: frozenset({State.PARTIALLY_SHIPPED, State.SHIPPED}),
    State.SHIPPED: frozenset({State.DELIVERED}),
    State.DELIVERED: frozenset(),
    State.CANCELLED: frozenset(),
}

# Targets a caller may name in TransitionOrder (partial shipping needs quantities).
TRANSITION_TARGETS = frozenset({State.PROCESSING, State.SHIPPED, State.DELIVERED, State.CANCELLED})


def check_transition(order_id: str, current: State, target: State) -> None:
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current])) or "none"
        raise FailedPrecondition(
            "INVALID_STATE_TRANSITION",
            f"order {order_id} is {current.value}; it cannot become {target.value} (allowed: {allowed})",
            metadata={"order_id": order_id, "state": current.value, "target_state": target.value},
        )


@dataclass(frozen=True)
class LineIn:
    line_id: str
    sku: str
    quantity: int
    unit_price: Money


@dataclass(frozen=True)
class PaymentIn:
    tender_id: str
    method: str
    captured: Money
    gateway_reference: str = ""


@dataclass(frozen=True)
class TotalsIn:
    subtotal: Money
    tax: Money
    shipping: Money
    discount: Money
    grand_total: Money


@dataclass(frozen=True)
class Intent:
    intent_id: str
    source_system: str
    lines: tuple[LineIn, ...]
    totals: TotalsIn
    payments: tuple[PaymentIn, ...] = ()
    external_order_id: str = ""
    customer_ref: str = ""
    submitted_at: datetime | None = None
    # Set on the intent of a reissue (ReissueOrder): the order it reissues, and why.
    reissued_from: str = ""
    reissue_reason: str = ""


def _money(v: Violations, path: str, m: Money, currency: str, *, allow_zero: bool = True) -> None:
    if m.currency != currency:
        v.add(
            path + ".currency_code", f"must be the channel's currency {currency} (got {m.currency or 'none'})"
        )
    if m.amount_minor < 0:
        v.add(path + ".amount_minor", "must not be negative")
    elif m.amount_minor > MAX_AMOUNT_MINOR:
        v.add(path + ".amount_minor", f"must be at most {MAX_AMOUNT_MINOR}")
    elif not allow_zero and m.amount_minor == 0:
        v.add(path + ".amount_minor", "must be positive")


def validate_intent(intent: Intent, channel_currency: str) -> None:
    """Raises InvalidArgument (reason INVALID_ORDER_INTENT) listing every problem."""
    v = Violations()
    _check_intent_ids(v, intent, channel_currency)
    subtotal = _check_intent_lines(v, intent.lines, channel_currency)
    _check_intent_totals(v, intent.totals, subtotal, channel_currency)
    _check_intent_payments(v, intent.payments, intent.totals.grand_total, channel_currency)
    v.raise_if_any("the order intent is invalid", reason="INVALID_ORDER_INTENT")


def _check_intent_ids(v: Violations, intent: Intent, channel_currency: str) -> None:
    p = "intent."
    if not ID_TEXT.match(intent.intent_id):
        v.add(p + "intent_id", "must be 1 to 128 printable ASCII characters without spaces")
    if not SHORT_ID.match(intent.source_system):
        v.add(p + "source_system", "must be 1 to 64 printable ASCII characters without spaces")
    if intent.external_order_id and not ID_TEXT.match(intent.external_order_id):
        v.add(p + "external_order_id", "must be up to 128 printable ASCII characters without spaces")
    if len(intent.customer_ref) > 128:
        v.add(p + "customer_ref", "must be at most 128 characters")
    if not is_currency(channel_currency):
        v.add(
            p + "totals.grand_total.currency_code", f"channel currency {channel_currency!r} is not supported"
        )


def _check_intent_lines(v: Violations, lines: Sequence[LineIn], channel_currency: str) -> int:
    """Checks the lines; the sum of their totals (negative parts counted as 0)."""
    p = "intent."
    if not lines:
        v.add(p + "lines", "an order needs at least one line")
    if len(lines) > MAX_LINES:
        v.add(p + "lines", f"at most {MAX_LINES} lines")
    seen: set[str] = set()
    subtotal = 0
    for i, line in enumerate(lines[:MAX_LINES]):
        lp = f"{p}lines[{i}]."
        if not SHORT_ID.match(line.line_id):
            v.add(lp + "line_id", "must be 1 to 64 printable ASCII characters without spaces")
        elif line.line_id in seen:
            v.add(lp + "line_id", f"duplicate line_id {line.line_id!r}")
        seen.add(line.line_id)
        if not line.sku.strip() or len(line.sku) > 128:
            v.add(lp + "sku", "must be 1 to 128 characters")
        if not 0 < line.quantity <= MAX_QUANTITY:
            v.add(lp + "quantity", f"must be between 1 and {MAX_QUANTITY}")
        _money(v, lp + "unit_price", line.unit_price, channel_currency)
        subtotal += max(line.quantity, 0) * max(line.unit_price.amount_minor, 0)
    return subtotal


def _check_intent_totals(v: Violations, t: TotalsIn, subtotal: int, channel_currency: str) -> None:
    p = "intent."
    for name in ("subtotal", "tax", "shipping", "discount", "grand_total"):
        _money(v, f"{p}totals.{name}", getattr(t, name), channel_currency)
    if t.subtotal.amount_minor != subtotal:
        v.add(
            p + "totals.subtotal",
            f"must equal the sum of the line totals ({subtotal}), got {t.subtotal.amount_minor}",
        )
    expected = (
        t.subtotal.amount_minor + t.tax.amount_minor + t.shipping.amount_minor - t.discount.amount_minor
    )
    if t.grand_total.amount_minor != expected:
        v.add(
            p + "totals.grand_total",
            f"must equal subtotal + tax + shipping - discount ({expected}), got {t.grand_total.amount_minor}",
        )


def _check_intent_payments(
    v: Violations, payments: Sequence[PaymentIn], grand_total: Money, channel_currency: str
) -> None:
    p = "intent."
    if len(payments) > MAX_PAYMENTS:
        v.add(p + "payments", f"at most {MAX_PAYMENTS} payments")
    tenders: set[str] = set()
    captured = 0
    for i, pay in enumerate(payments[:MAX_PAYMENTS]):
        pp = f"{p}payments[{i}]."
        if not SHORT_ID.match(pay.tender_id):
            v.add(pp + "tender_id", "must be 1 to 64 printable ASCII characters without spaces")
        elif pay.tender_id in tenders:
            v.add(pp + "tender_id", f"duplicate tender_id {pay.tender_id!r}")
        tenders.add(pay.tender_id)
        if not pay.method.strip() or len(pay.method) > 64:
            v.add(pp + "method", "must be 1 to 64 characters")
        if len(pay.gateway_reference) > 256:
            v.add(pp + "gateway_reference", "must be at most 256 characters")
        _money(v, pp + "captured", pay.captured, channel_currency)
        captured += max(pay.captured.amount_minor, 0)
    if captured > grand_total.amount_minor:
        v.add(
            p + "payments",
            f"captured amounts ({captured}) exceed the grand total ({grand_total.amount_minor})",
        )


def _m(m: Money) -> list[Any]:
    return [m.currency, m.amount_minor]


def canonical_content(intent: Intent, channel: str) -> dict[str, Any]:
    """Everything that identifies what was asked for, in a stable JSON shape."""
    t = intent.totals
    return {
        "channel": channel,
        "source_system": intent.source_system,
        "intent_id": intent.intent_id,
        "external_order_id": intent.external_order_id,
        "customer_ref": intent.customer_ref,
        "lines": [
            {"line_id": li.line_id, "sku": li.sku, "quantity": li.quantity, "unit_price": _m(li.unit_price)}
            for li in intent.lines
        ],
        "totals": {
            "subtotal": _m(t.subtotal),
            "tax": _m(t.tax),
            "shipping": _m(t.shipping),
            "discount": _m(t.discount),
            "grand_total": _m(t.grand_total),
        },
        "payments": [
            {
                "tender_id": pa.tender_id,
                "method": pa.method,
                "captured": _m(pa.captured),
                "gateway_reference": pa.gateway_reference,
            }
            for pa in intent.payments
        ],
        "submit_time": intent.submitted_at.isoformat() if intent.submitted_at else None,
        # Only on reissues, so the content (and hash) of every other intent is unchanged.
        **(
            {"reissue": {"of": intent.reissued_from, "reason": intent.reissue_reason}}
            if intent.reissued_from
            else {}
        ),
    }


def intent_of_content(content: Mapping[str, Any]) -> Intent:
    """The intent a stored canonical content describes (its inverse, for audits)."""
    t = content["totals"]
    reissue = content.get("reissue") or {}

    def money(v: list[Any]) -> Money:
        return Money(str(v[0]), int(v[1]))

    return Intent(
        intent_id=content["intent_id"],
        source_system=content["source_system"],
        external_order_id=content["external_order_id"],
        customer_ref=content["customer_ref"],
        lines=tuple(
            LineIn(x["line_id"], x["sku"], int(x["quantity"]), money(x["unit_price"]))
            for x in content["lines"]
        ),
        totals=TotalsIn(
            money(t["subtotal"]),
            money(t["tax"]),
            money(t["shipping"]),
            money(t["discount"]),
            money(t["grand_total"]),
        ),
        payments=tuple(
            PaymentIn(p["tender_id"], p["method"], money(p["captured"]), p["gateway_reference"])
            for p in content["payments"]
        ),
        submitted_at=datetime.fromisoformat(content["submit_time"]) if content.get("submit_time") else None,
        reissued_from=str(reissue.get("of", "")),
        reissue_reason=str(reissue.get("reason", "")),
    )


def content_hash(content: dict[str, Any]) -> bytes:
    raw = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(raw.encode()).digest()


def _is_money(v: list[Any]) -> bool:
    # Money is [currency, amount] in the canonical content: compare it whole.
    return len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)


def differing_fields(old: Any, new: Any, path: str = "intent", limit: int = 20) -> list[str]:
    """Paths (in the contract's field names) where two canonical contents differ."""
    out: list[str] = []

    def walk(a: Any, b: Any, p: str) -> None:
        if len(out) >= limit or a == b:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{p}.{k}")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and not _is_money(a):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{p}[{i}]")
        else:
            out.append(p)

    walk(old, new, path)
    return out


@dataclass(frozen=True)
class StatusIn:
    code: str
    severity: Severity = Severity.INFO
    category: str = ""
    payload: dict[str, Any] = field(default_factory=dict)
    recorded_at: datetime | None = None


# Codes the service writes itself; outside writers get only manual adjustments in `order`.
EXTERNAL_ORDER_CODES = frozenset({"order:manually_adjusted"})


def parse_payload(raw: str) -> dict[str, Any]:
    if not raw.strip():
        return {}
    if len(raw.encode()) > MAX_PAYLOAD_BYTES:
        raise InvalidArgument(
            "INVALID_STATUS_ENTRY",
            "payload too large",
            field_violations=_fv("entry.payload_json", f"must be at most {MAX_PAYLOAD_BYTES} bytes"),
        )
    try:
        # Integers stay integers; reject floats so money never travels as one.
        value = json.loads(raw, parse_float=_no_float, parse_constant=_no_float)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(
            "INVALID_STATUS_ENTRY",
            "payload_json is invalid",
            field_violations=_fv("entry.payload_json", str(exc)),
        ) from exc
    if not isinstance(value, dict):
        raise InvalidArgument(
            "INVALID_STATUS_ENTRY",
            "payload_json must be a JSON object",
            field_violations=_fv("entry.payload_json", "must be a JSON object"),
        )
    return value


def _no_float(s: str) -> Any:
    raise ValueError(f"non-integer number {s!r}: send amounts as integer minor units or strings")


def _fv(path: str, description: str) -> list[FieldViolation]:
    return [FieldViolation(path, description)]


def validate_status(entry: StatusIn, namespaces: frozenset[str], *, external: bool = True) -> tuple[str, str]:
    """Returns (module, status) or raises; `external` applies the writer's namespace rules."""
    v = Violations()
    m = CODE.match(entry.code)
    if m is None:
        v.add("entry.code", "must be `module:status` in lower case, e.g. `procurement:blocking_exception`")
    if len(entry.category) > 64:
        v.add("entry.category", "must be at most 64 characters")
    if entry.code in EXTERNAL_ORDER_CODES and not str(entry.payload.get("note", "")).strip():
        v.add("entry.payload_json", 'a manual adjustment needs a non-empty "note"')
    v.raise_if_any("the status entry is invalid", reason="INVALID_STATUS_ENTRY")
    assert m is not None
    module, status = m.group(1), m.group(2)
    if external:
        if module not in namespaces and "*" not in namespaces:
            raise PermissionDenied(
                "STATUS_NAMESPACE_FORBIDDEN",
                f"this caller may not write `{module}:*` entries (allowed: {', '.join(sorted(namespaces)) or 'none'})",
                metadata={"namespace": module},
            )
        if module == "order" and entry.code not in EXTERNAL_ORDER_CODES:
            raise PermissionDenied(
                "STATUS_CODE_RESERVED",
                f"`{entry.code}` is written by the order service itself; use order:manually_adjusted",
                metadata={"code": entry.code},
            )
    return module, status


# ---------------------------------------------------------------- shipments


def validate_shipment(lines: Sequence[tuple[str, int]], tracking_number: str, carrier: str) -> None:
    """The shape of a ShipOrderItems request: (line_id, quantity) pairs."""
    v = Violations()
    if not lines:
        v.add("lines", "ship at least one line")
    seen: set[str] = set()
    for i, (line_id, qty) in enumerate(lines):
        if line_id in seen:
            v.add(f"lines[{i}].line_id", f"line {line_id!r} appears twice")
        seen.add(line_id)
        if qty <= 0:
            v.add(f"lines[{i}].quantity", "must be positive")
    if len(tracking_number) > 128:
        v.add("tracking_number", "at most 128 characters")
    if len(carrier) > 64:
        v.add("carrier", "at most 64 characters")
    v.raise_if_any("the shipment is invalid")


def check_shippable(
    order_id: str, left_to_ship: Mapping[str, int], wanted: Sequence[tuple[str, int]]
) -> None:
    """Every wanted line exists (INVALID_ARGUMENT) and has that much left to
    ship (FAILED_PRECONDITION, QUANTITY_EXCEEDS_REMAINING)."""
    v = Violations()
    over: list[PreconditionViolation] = []
    for i, (line_id, qty) in enumerate(wanted):
        left = left_to_ship.get(line_id)
        if left is None:
            v.add(f"lines[{i}].line_id", f"order has no line {line_id!r}")
        elif qty > left:
            over.append(
                PreconditionViolation(
                    "QUANTITY_EXCEEDS_REMAINING",
                    f"orders/{order_id}/lines/{line_id}",
                    f"asked {qty}, {left} left to ship",
                )
            )
    v.raise_if_any("the shipment is invalid")
    if over:
        raise FailedPrecondition(
            "QUANTITY_EXCEEDS_REMAINING",
            "a line would ship more than was ordered",
            metadata={"order_id": order_id},
            precondition_violations=over,
        )


# ---------------------------------------------------------------- refunds


def validate_refund(refund_id: str, lines: Mapping[str, int], amounts: Mapping[str, int]) -> None:
    """The shape of a refund: quantities per line id, amounts per tender id."""
    v = Violations()
    if not refund_id or len(refund_id) > 128:
        v.add("refund_id", "must be 1 to 128 characters")
    for lid, q in lines.items():
        if q <= 0:
            v.add(f"lines[{lid}]", "quantity must be positive")
    for tid, a in amounts.items():
        if a <= 0:
            v.add(f"amounts[{tid}]", "amount must be positive")
    if not lines and not amounts:
        v.add("lines", "record at least one line or amount")
    v.raise_if_any("the refund is invalid")


@dataclass(frozen=True)
class Refundable:
    """How much of one line (units) or one tender (minor units) there is and how much was refunded."""

    total: int
    refunded: int


def check_refundable(
    order_id: str,
    refund_id: str,
    lines: Mapping[str, int],
    amounts: Mapping[str, int],
    *,
    line_counts: Mapping[str, Refundable],
    tender_amounts: Mapping[str, Refundable],
) -> None:
    """No line refunds more units than it was ordered with, no tender more than
    it captured (FAILED_PRECONDITION, REFUND_EXCEEDS_REFUNDABLE, every excess listed)."""
    over: list[PreconditionViolation] = []
    for lid, q in sorted(lines.items()):
        li = line_counts.get(lid)
        if li is None or li.refunded + q > li.total:
            left = "unknown line" if li is None else f"{li.total - li.refunded} refundable"
            over.append(
                PreconditionViolation(
                    "REFUND_EXCEEDS_REFUNDABLE", f"orders/{order_id}/lines/{lid}", f"{q} asked, {left}"
                )
            )
    for tid, a in sorted(amounts.items()):
        pay = tender_amounts.get(tid)
        if pay is None or pay.refunded + a > pay.total:
            left = "unknown tender" if pay is None else f"{pay.total - pay.refunded} refundable"
            over.append(
                PreconditionViolation(
                    "REFUND_EXCEEDS_REFUNDABLE", f"orders/{order_id}/payments/{tid}", f"{a} asked, {left}"
                )
            )
    if over:
        raise FailedPrecondition(
            "REFUND_EXCEEDS_REFUNDABLE",
            "the refund exceeds what is refundable",
            metadata={"order_id": order_id, "refund_id": refund_id},
            precondition_violations=over,
        )
