"""Pure rules of carts: states, line validation, totals, purchase limits and
their time window. No I/O here, so all of it is unit-tested without a database.
"""

from __future__ import annotations

import unicodedata
import zoneinfo
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from enum import StrEnum

from domain.shared.errors import FailedPrecondition, PermissionDenied, PreconditionViolation, Violations
from domain.shared.money import Money

MAX_LINES = 200
MAX_QUANTITY = 1_000_000
MAX_UNIT_PRICE_MINOR = 10**12
MAX_SKU = 128
MAX_CUSTOMER_REF = 128
WINDOW_DAYS = 30
DEFAULT_HOLD_TTL = timedelta(minutes=15)
MAX_HOLD_TTL = timedelta(hours=24)
MAX_LIMIT = 10**9


class CartState(StrEnum):
    ACTIVE = "active"
    PENDING_APPROVAL = "pending_approval"
    APPROVED = "approved"
    APPROVED_BLOCKED_INVENTORY = "approved_blocked_inventory"
    REJECTED = "rejected"
    CONVERTED = "converted"


# Line edits are allowed here; an edit of a rejected or approved cart makes it
# active again (an approved one needs a new approval: its approval is stale).
APPROVED_STATES = frozenset({CartState.APPROVED, CartState.APPROVED_BLOCKED_INVENTORY})
EDITABLE = frozenset({CartState.ACTIVE, CartState.REJECTED}) | APPROVED_STATES
LOCKED = frozenset({CartState.PENDING_APPROVAL})


def check_editable(cart_id: str, state: CartState) -> None:
    if state is CartState.CONVERTED:
        raise FailedPrecondition(
            "CART_CONVERTED", f"cart {cart_id} is already checked out", metadata={"cart_id": cart_id}
        )
    if state in LOCKED:
        raise FailedPrecondition(
            "CART_LOCKED",
            f"cart {cart_id} is {state.value}: it cannot change while waiting for an approval",
            metadata={"cart_id": cart_id, "state": state.value},
        )


def check_can_checkout(cart_id: str, state: CartState, approval_required: bool) -> None:
    meta = {"cart_id": cart_id, "state": state.value}
    if state is CartState.CONVERTED:
        raise FailedPrecondition("CART_CONVERTED", f"cart {cart_id} is already checked out", metadata=meta)
    if state is CartState.PENDING_APPROVAL:
        raise FailedPrecondition("APPROVAL_PENDING", f"cart {cart_id} waits for an approval", metadata=meta)
    if state is CartState.REJECTED:
        raise FailedPrecondition("CART_REJECTED", f"cart {cart_id} was rejected", metadata=meta)
    if approval_required and state is CartState.ACTIVE:
        raise FailedPrecondition(
            "APPROVAL_REQUIRED", f"cart {cart_id} needs an approval before checkout", metadata=meta
        )


@dataclass(frozen=True)
class LineDraft:
    """A line as the caller sends it (validated by `check_line`)."""

    sku: str
    quantity: int
    unit_price: Money


def nfc(sku: str) -> str:
    """SKUs are compared and stored in Unicode normal form C."""
    return unicodedata.normalize("NFC", sku)


def check_sku(v: Violations, path: str, sku: str) -> None:
    # Same rule as inventory's (NFC is applied by the caller of this check).
    if not 1 <= len(sku) <= MAX_SKU or not sku.isprintable() or sku != sku.strip():
        v.add(path, f"must be 1 to {MAX_SKU} printable characters without leading or trailing spaces")


def check_quantity(v: Violations, path: str, quantity: int) -> None:
    if not 1 <= quantity <= MAX_QUANTITY:
        v.add(path, f"must be between 1 and {MAX_QUANTITY}")


def check_price(v: Violations, path: str, price: Money, currency: str) -> None:
    if price.currency != currency:
        v.add(
            path + ".currency_code",
            f"must be the channel's currency {currency} (got {price.currency or 'none'})",
        )
    if not 0 <= price.amount_minor <= MAX_UNIT_PRICE_MINOR:
        v.add(path + ".amount_minor", f"must be between 0 and {MAX_UNIT_PRICE_MINOR}")


def check_line(v: Violations, path: str, line: LineDraft, currency: str) -> None:
    check_sku(v, path + ".sku", line.sku)
    check_quantity(v, path + ".quantity", line.quantity)
    check_price(v, path + ".unit_price", line.unit_price, currency)


def check_customer_ref(v: Violations, path: str, ref: str) -> None:
    if not ref.strip() or len(ref) > MAX_CUSTOMER_REF or ref != ref.strip() or not ref.isprintable():
        v.add(
            path, f"must be 1 to {MAX_CUSTOMER_REF} printable characters without leading or trailing spaces"
        )


def check_text(v: Violations, path: str, value: str, limit: int = 2000) -> None:
    """Free text (notes, reasons): bounded, and no NUL (PostgreSQL text cannot hold it)."""
    if len(value) > limit:
        v.add(path, f"must be at most {limit} characters")
    if "\x00" in value:
        v.add(path, "must not contain NUL characters")


def check_line_id(v: Violations, path: str, line_id: str) -> None:
    if not 1 <= len(line_id) <= 64 or not line_id.isprintable():
        v.add(path, "is required: the line_id of one of the cart's lines")


def check_version(v: Violations, version: int) -> None:
    if version < 1:
        v.add("version", "is required: the version of the cart you last read")


def check_hold_ttl(v: Violations, ttl: timedelta | None) -> timedelta:
    if ttl is None:
        return DEFAULT_HOLD_TTL
    if not timedelta(0) < ttl <= MAX_HOLD_TTL:
        v.add("ttl", "must be positive and at most 24 hours")
    return ttl


def line_total(quantity: int, unit_price_minor: int) -> int:
    return quantity * unit_price_minor


def subtotal(lines: Sequence[tuple[int, int]]) -> int:
    """Sum of quantity x unit price over (quantity, unit_price_minor) pairs; integers only."""
    return sum(line_total(q, p) for q, p in lines)


# ------------------------------------------------------------------ purchase limits


@dataclass(frozen=True)
class Limit:
    sku: str
    min_quantity: int = 0
    order_multiple: int = 0
    max_per_order: int = 0
    max_per_customer: int = 0
    updated_at: datetime | None = None


def check_limit_values(v: Violations, limit: Limit) -> None:
    check_sku(v, "limit.sku", limit.sku)
    for name in ("min_quantity", "order_multiple", "max_per_order", "max_per_customer"):
        value = getattr(limit, name)
        if not 0 <= value <= MAX_LIMIT:
            v.add(f"limit.{name}", f"must be between 0 and {MAX_LIMIT} (0 = no limit)")
    if limit.max_per_order and limit.min_quantity > limit.max_per_order:
        v.add("limit.min_quantity", "must not exceed max_per_order")
    if limit.max_per_customer and limit.min_quantity > limit.max_per_customer:
        v.add("limit.min_quantity", "must not exceed max_per_customer")


def limit_violations(limit: Limit, quantity: int, bought_in_window: int) -> list[PreconditionViolation]:
    """Every rule a quantity of one SKU breaks. `bought_in_window` is what the
    customer already bought in the rolling window, net of refunds."""
    out: list[PreconditionViolation] = []
    sku = limit.sku
    if limit.min_quantity and quantity < limit.min_quantity:
        out.append(
            PreconditionViolation(
                "MIN_QUANTITY", sku, f"at least {limit.min_quantity} per order, got {quantity}"
            )
        )
    if limit.order_multiple > 1 and quantity % limit.order_multiple:
        out.append(
            PreconditionViolation(
                "ORDER_MULTIPLE", sku, f"must be a multiple of {limit.order_multiple}, got {quantity}"
            )
        )
    if limit.max_per_order and quantity > limit.max_per_order:
        out.append(
            PreconditionViolation(
                "MAX_PER_ORDER", sku, f"at most {limit.max_per_order} per order, got {quantity}"
            )
        )
    if limit.max_per_customer:
        bought = max(bought_in_window, 0)
        if bought + quantity > limit.max_per_customer:
            out.append(
                PreconditionViolation(
                    "MAX_PER_CUSTOMER",
                    sku,
                    f"at most {limit.max_per_customer} per customer in {WINDOW_DAYS} days: "
                    f"already bought {bought}, requested {quantity}",
                )
            )
    return out


def raise_limit_violations(violations: list[PreconditionViolation]) -> None:
    if violations:
        raise FailedPrecondition(
            "PURCHASE_LIMIT_EXCEEDED",
            "the cart breaks purchase limits: "
            + "; ".join(f"{x.subject}: {x.description}" for x in violations),
            precondition_violations=violations,
        )


def check_limits(
    limits: Mapping[str, Limit], quantities: Mapping[str, int], bought: Mapping[str, int]
) -> list[PreconditionViolation]:
    out: list[PreconditionViolation] = []
    for sku in sorted(quantities):
        limit = limits.get(sku)
        if limit is not None:
            out += limit_violations(limit, quantities[sku], bought.get(sku, 0))
    return out


def window_start(now: datetime, timezone: str, days: int = WINDOW_DAYS) -> datetime:
    """Start of the rolling window: local midnight of the first of `days`
    calendar days (today included) in the channel's time zone, as an aware
    datetime. Calendar days, so a purchase at 00:30 local time belongs to that
    local day whatever UTC says; DST days are 23 or 25 hours long."""
    tz = zoneinfo.ZoneInfo(timezone)
    first: date = now.astimezone(tz).date() - timedelta(days=days - 1)
    return datetime.combine(first, time(0), tzinfo=tz)


@dataclass(frozen=True)
class Shortage:
    sku: str
    description: str


@dataclass(frozen=True)
class ApprovedLine:
    """A line as an approval approved it."""

    line_id: str
    sku: str
    quantity: int
    unit_price_minor: int


@dataclass(frozen=True)
class ApprovalInfo:
    submitted_by: str = ""
    submitted_at: datetime | None = None
    note: str = ""
    decision: str = ""  # "", "approve", "reject"
    decided_by: str = ""
    decided_at: datetime | None = None
    reason: str = ""
    shortages: list[Shortage] = field(default_factory=list)
    # Set by an approval: the sum of the approved line totals and the lines.
    approved_grand_total: Money | None = None
    approved_lines: tuple[ApprovedLine, ...] = ()
    # The cart no longer is what was approved.
    stale: bool = False


def approved_total(lines: Sequence[ApprovedLine]) -> int:
    return sum(line_total(x.quantity, x.unit_price_minor) for x in lines)


def approval_stale(
    state: CartState, approved: Sequence[ApprovedLine] | None, current: Sequence[ApprovedLine]
) -> bool:
    """An approval on record no longer covers the cart: it was edited after the
    approval (which made it active again), or its lines differ from the approved ones."""
    if approved is None:
        return False
    if state in APPROVED_STATES or state is CartState.CONVERTED:
        return tuple(approved) != tuple(current)
    return state is CartState.ACTIVE


def check_approval_current(
    cart_id: str,
    state: CartState,
    approval_required: bool,
    approved: Sequence[ApprovedLine] | None,
    approved_grand_total: int | None,
    current: Sequence[ApprovedLine],
) -> None:
    """Checkout converts only what was approved: APPROVAL_STALE when the cart's
    lines or total differ from its approval, or when an approval it needs was
    invalidated by an edit."""
    if approved is None or approved_grand_total is None:
        return
    if state is CartState.ACTIVE and not approval_required:
        return  # an approval it did not need; the edit simply left it behind
    if (
        state is CartState.ACTIVE
        or tuple(approved) != tuple(current)
        or (approved_total(current) != approved_grand_total)
    ):
        raise FailedPrecondition(
            "APPROVAL_STALE",
            f"cart {cart_id} changed after its approval (approved total {approved_grand_total}, "
            f"now {approved_total(current)}); submit it for approval again",
            metadata={
                "cart_id": cart_id,
                "approved_grand_total_minor": str(approved_grand_total),
                "grand_total_minor": str(approved_total(current)),
            },
        )


def check_decider(cart_id: str, decider: str, submitted_by: str, created_by: str) -> None:
    """Four-eyes rule: whoever submitted (or created) the cart never decides it."""
    if decider in (submitted_by, created_by):
        raise PermissionDenied(
            "SELF_APPROVAL_FORBIDDEN",
            f"{decider!r} submitted or created cart {cart_id} and cannot decide its approval",
            metadata={"cart_id": cart_id},
        )
