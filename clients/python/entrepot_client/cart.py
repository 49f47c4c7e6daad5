"""Helpers for CartService on top of the generated `CartClient` (`Entrepot(...).cart`).

from entrepot_client.cart import line, with_latest_version

cart = await ep.cart.create_cart(cart_pb2.CreateCartRequest(
    cart=cart_pb2.Cart(customer_ref="acme", lines=[line("SKU-A", 2, 1250, "EUR")])))

# Optimistic concurrency: re-read the cart and retry when someone else changed it first.
cart = await with_latest_version(ep.cart, cart.id, lambda c: ep.cart.update_cart_line(
    cart_pb2.UpdateCartLineRequest(cart_id=c.id, version=c.version,
        line=cart_pb2.CartLine(line_id="ln-1", quantity=3), update_mask={"paths": ["quantity"]})))
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from entrepot.cart.v1 import cart_pb2
from entrepot.platform.v1 import types_pb2
from entrepot_client._services import CartClient
from entrepot_client.errors import AbortedError

__all__ = ["approval_covers", "line", "shortages", "with_latest_version"]

T = TypeVar("T")


def line(sku: str, quantity: int, unit_price_minor: int, currency: str) -> cart_pb2.CartLine:
    return cart_pb2.CartLine(
        sku=sku,
        quantity=quantity,
        unit_price=types_pb2.Money(currency_code=currency, amount_minor=unit_price_minor),
    )


async def with_latest_version(
    client: CartClient, cart_id: str, change: Callable[[cart_pb2.Cart], Awaitable[T]], *, attempts: int = 5
) -> T:
    """Read the cart, call `change(cart)` (which sends `cart.version`), and on
    ABORTED CART_VERSION_MISMATCH read again and retry, up to `attempts` times.
    Use it only for changes that still make sense on a newer cart."""
    for attempt in range(attempts):
        cart = await client.get_cart(cart_pb2.GetCartRequest(cart_id=cart_id))
        try:
            return await change(cart)
        except AbortedError as err:
            if err.reason != "CART_VERSION_MISMATCH" or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def approval_covers(cart: cart_pb2.Cart) -> bool:
    """The cart has an approval on record that still covers its lines and total
    (CheckoutCart refuses a stale one with APPROVAL_STALE)."""
    a = cart.approval
    return (
        cart.HasField("approval")
        and a.decision == cart_pb2.Approval.DECISION_APPROVE
        and not a.stale
        and a.approved_grand_total.amount_minor == cart.subtotal.amount_minor
    )


def shortages(err: Exception) -> dict[str, str]:
    """SKU -> description from a FAILED_PRECONDITION INSUFFICIENT_STOCK error ({} otherwise)."""
    if getattr(err, "reason", "") != "INSUFFICIENT_STOCK":
        return {}
    return {v.subject: v.description for v in getattr(err, "precondition_violations", [])}
