"""Carts: the public interface of the module (the servicer uses only this).

Every function takes the caller's AsyncSession and never commits, so checkout
(limits + inventory reservation + order intent + cart conversion) is one
transaction. Inventory and orders are reached only through their public
interfaces (domain.inventory, domain.order).

Refunds plug in through `RefundedQuantities` (ports.py): pass an
implementation as `refunds=` to create_cart / add_line / update_line /
remove_line / checkout; the default NO_REFUNDS credits nothing back.
RefundModuleQuantities adapts domain.refund.refunded_quantity; the servicer
uses it (server/services/cart.py).

Layout: types.py (what the module answers with), rules.py (pure decisions),
store.py (every statement), and modules that load, decide with the rules,
save and emit: service.py (carts, lines, holds), limits.py (purchase
limits), approval.py, checkout.py.

Data access: SQL text with named parameters, run as SQLAlchemy text()
statements, except CheckoutCart's own two statements, which run on the
session's asyncpg connection (domain.shared.db.driver_connection,
DriverStatement) in the same transaction.
"""

from domain.cart.approval import decide_approval, submit_for_approval
from domain.cart.checkout import checkout
from domain.cart.limits import get_purchase_limit, set_purchase_limit
from domain.cart.ports import NO_REFUNDS, NoRefunds, RefundedQuantities, RefundModuleQuantities
from domain.cart.rules import (
    DEFAULT_HOLD_TTL,
    MAX_HOLD_TTL,
    WINDOW_DAYS,
    ApprovalInfo,
    CartState,
    Limit,
    LineDraft,
    Shortage,
    window_start,
)
from domain.cart.service import (
    add_line,
    create_cart,
    get_cart,
    hold_stock,
    list_carts,
    release_hold,
    remove_line,
    update_line,
)
from domain.cart.types import LINE_UPDATABLE, SOURCE_SYSTEM, Cart, CartLine, CheckoutResult, Hold, Payment

__all__ = [
    "DEFAULT_HOLD_TTL",
    "LINE_UPDATABLE",
    "MAX_HOLD_TTL",
    "NO_REFUNDS",
    "SOURCE_SYSTEM",
    "WINDOW_DAYS",
    "ApprovalInfo",
    "Cart",
    "CartLine",
    "CartState",
    "CheckoutResult",
    "Hold",
    "Limit",
    "LineDraft",
    "NoRefunds",
    "Payment",
    "RefundModuleQuantities",
    "RefundedQuantities",
    "Shortage",
    "add_line",
    "checkout",
    "create_cart",
    "decide_approval",
    "get_cart",
    "get_purchase_limit",
    "hold_stock",
    "list_carts",
    "release_hold",
    "remove_line",
    "set_purchase_limit",
    "submit_for_approval",
    "update_line",
    "window_start",
]
