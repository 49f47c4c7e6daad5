"""What the cart module answers with. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from domain.cart.rules import ApprovalInfo, CartState, line_total
from domain.shared.money import Money

SOURCE_SYSTEM = "cart"  # the source_system of the order intents carts submit
LINE_UPDATABLE = ("quantity", "unit_price")


@dataclass(frozen=True)
class CartLine:
    line_id: str
    sku: str
    quantity: int
    unit_price: Money

    @property
    def line_total(self) -> Money:
        return Money(self.unit_price.currency, line_total(self.quantity, self.unit_price.amount_minor))


@dataclass(frozen=True)
class Hold:
    state: str  # "none", "held", "expired", "released"
    reservation_id: str = ""
    expires_at: datetime | None = None
    ttl: timedelta | None = None


NO_HOLD = Hold("none")


@dataclass(frozen=True)
class Cart:
    id: str
    channel: str
    customer_ref: str
    currency: str
    version: int
    state: CartState
    lines: tuple[CartLine, ...]
    approval_required: bool
    hold: Hold
    approval: ApprovalInfo | None
    order_id: str
    created_by: str
    created_at: datetime
    updated_at: datetime

    @property
    def subtotal(self) -> Money:
        return Money(self.currency, sum(x.line_total.amount_minor for x in self.lines))

    @property
    def item_count(self) -> int:
        return sum(x.quantity for x in self.lines)


@dataclass(frozen=True)
class Payment:
    tender_id: str
    method: str
    captured: Money
    gateway_reference: str = ""


@dataclass(frozen=True)
class CheckoutResult:
    cart: Cart
    order_id: str
    reservation_id: str
