"""Per-channel purchase limits per SKU, and their enforcement on a customer's carts."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from domain.cart import store
from domain.cart.ports import RefundedQuantities
from domain.cart.rules import (
    Limit,
    check_limit_values,
    check_limits,
    check_sku,
    nfc,
    raise_limit_violations,
    window_start,
)
from domain.shared.caller import ChannelRef
from domain.shared.errors import NotFound, Violations
from domain.shared.outbox import Event, emit


async def set_purchase_limit(
    session: AsyncSession, *, channel: ChannelRef, limit: Limit, actor: str
) -> Limit:
    limit = Limit(
        nfc(limit.sku), limit.min_quantity, limit.order_multiple, limit.max_per_order, limit.max_per_customer
    )
    v = Violations()
    check_limit_values(v, limit)
    v.raise_if_any("the purchase limit is invalid")
    stored = await store.upsert_purchase_limit(session, channel.slug, limit)
    await emit(
        session,
        Event(
            "cart.purchase_limit_set",
            "purchase_limit",
            f"{channel.slug}:{limit.sku}",
            {"sku": limit.sku, "actor": actor},
            channel.slug,
        ),
    )
    return stored


async def get_purchase_limit(session: AsyncSession, *, channel: ChannelRef, sku: str) -> Limit:
    v = Violations()
    check_sku(v, "sku", nfc(sku))
    v.raise_if_any("the SKU is invalid")
    found = await store.purchase_limits(session, channel.slug, [nfc(sku)])
    if not found:
        raise NotFound(
            "PURCHASE_LIMIT_NOT_FOUND",
            f"no purchase limit for SKU {sku!r} in channel {channel.slug}",
            metadata={"sku": sku},
        )
    return next(iter(found.values()))


async def enforce_limits(
    session: AsyncSession,
    *,
    channel: ChannelRef,
    customer_ref: str,
    quantities: dict[str, int],
    now: datetime,
    refunds: RefundedQuantities,
    lock: bool,
    limits: dict[str, Limit] | None = None,
) -> None:
    """Raises PURCHASE_LIMIT_EXCEEDED listing every broken rule. With `lock`,
    the per-customer counts are read under the customer's SKU locks, held to
    commit, so two checkouts cannot both pass on the same remaining allowance.
    `limits`: the limits of these SKUs when the caller read them already."""
    if not quantities:
        return
    if limits is None:
        limits = await store.purchase_limits(session, channel.slug, sorted(quantities))
    per_customer = sorted(s for s, lim in limits.items() if lim.max_per_customer)
    bought: dict[str, int] = {}
    if per_customer:
        if lock:
            await store.lock_customer_skus(session, channel.slug, customer_ref, per_customer)
        bought = await _bought_net_of_refunds(
            session, channel=channel, customer_ref=customer_ref, skus=per_customer, now=now, refunds=refunds
        )
    raise_limit_violations(check_limits(limits, quantities, bought))


async def _bought_net_of_refunds(
    session: AsyncSession,
    *,
    channel: ChannelRef,
    customer_ref: str,
    skus: list[str],
    now: datetime,
    refunds: RefundedQuantities,
) -> dict[str, int]:
    """Units of each SKU the customer bought in the limit window, less those refunded."""
    since = window_start(now, channel.timezone)
    bought = await store.bought_since(session, channel.slug, customer_ref, skus, since)
    refunded = await refunds.refunded_quantities(
        session, channel=channel.slug, customer_ref=customer_ref, skus=skus, since=since
    )
    for sku, q in refunded.items():
        if sku in bought:
            bought[sku] -= int(q)
    return bought
