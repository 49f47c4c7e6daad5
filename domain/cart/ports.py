"""What carts need from modules that are not theirs, behind small protocols.

RefundedQuantities: the refund module reports units refunded per SKU, so the
per-customer purchase limit credits them back. The servicer passes
RefundModuleQuantities (server/services/cart.py); NO_REFUNDS, the default for other
callers, reads nothing (limits then count gross purchases: the strict side).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession


class RefundedQuantities(Protocol):
    async def refunded_quantities(
        self,
        session: AsyncSession,
        *,
        channel: str,
        customer_ref: str,
        skus: Sequence[str],
        since: datetime,
    ) -> Mapping[str, int]:
        """Units refunded per SKU for this customer's orders in `channel` placed at
        or after `since` (the start of the limit window), read in the caller's
        transaction. SKUs without refunds may be absent."""
        ...


class NoRefunds:
    async def refunded_quantities(
        self,
        session: AsyncSession,
        *,
        channel: str,
        customer_ref: str,
        skus: Sequence[str],
        since: datetime,
    ) -> Mapping[str, int]:
        return {}


NO_REFUNDS: RefundedQuantities = NoRefunds()


class RefundModuleQuantities:
    """RefundedQuantities over the refund module's public interface
    (`domain.refund.refunded_quantity(session, channel=, customer_ref=, sku=, since=)`:
    completed refunds on orders submitted since `since`). Imported lazily: refunds
    depend on orders, and carts need not load them at import time."""

    async def refunded_quantities(
        self,
        session: AsyncSession,
        *,
        channel: str,
        customer_ref: str,
        skus: Sequence[str],
        since: datetime,
    ) -> Mapping[str, int]:
        import domain.refund as refund

        out: dict[str, int] = {}
        for sku in skus:
            q = await refund.refunded_quantity(
                session, channel=channel, customer_ref=customer_ref, sku=sku, since=since
            )
            if q:
                out[sku] = int(q)
        return out
