"""The three inventory hooks orders need, behind a small protocol.

Order depends on Inventory only for reserve / fulfil / release, always with
the caller's session so stock and order change in one transaction. The
default implementation calls domain.inventory's public interface; tests of
pure order behaviour may pass another implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession


@dataclass(frozen=True)
class StockLine:
    sku: str
    quantity: int


@dataclass(frozen=True)
class Reserved:
    reservation_id: str
    # Units per SKU that exceeded on_hand (the item allows backorders).
    backordered: dict[str, int]


class InventoryPort(Protocol):
    async def reserve(
        self,
        session: AsyncSession,
        lines: Sequence[StockLine],
        *,
        reference: str,
        actor: str,
        channel: str = "",
    ) -> Reserved:
        """All or nothing; `channel`: only from that channel's warehouses, by its strategy."""
        ...

    async def fulfil(
        self,
        session: AsyncSession,
        reservation_id: str,
        lines: Sequence[StockLine],
        *,
        reference: str,
        actor: str,
    ) -> None: ...

    async def release(self, session: AsyncSession, reservation_id: str, *, reason: str, actor: str) -> None:
        """Releases everything the reservation still holds."""
        ...


class DomainInventory:
    """InventoryPort over domain.inventory's public interface."""

    async def reserve(
        self,
        session: AsyncSession,
        lines: Sequence[StockLine],
        *,
        reference: str,
        actor: str,
        channel: str = "",
    ) -> Reserved:
        import domain.inventory as inventory

        res = await inventory.reserve(
            session,
            [inventory.LineRequest(sku=li.sku, quantity=li.quantity) for li in lines],
            reference=reference,
            ttl=None,
            actor=actor,
            source="order",
            channel=channel,
        )
        backordered: dict[str, int] = {}
        for line in res.lines:
            if line.backordered:
                backordered[line.sku] = backordered.get(line.sku, 0) + line.backordered
        return Reserved(reservation_id=str(res.id), backordered=backordered)

    async def fulfil(
        self,
        session: AsyncSession,
        reservation_id: str,
        lines: Sequence[StockLine],
        *,
        reference: str,
        actor: str,
    ) -> None:
        import domain.inventory as inventory

        await inventory.fulfil(
            session,
            reservation_id,
            [inventory.LineQuantity(sku=li.sku, quantity=li.quantity) for li in lines],
            reference=reference,
            actor=actor,
            source="order",
        )

    async def release(self, session: AsyncSession, reservation_id: str, *, reason: str, actor: str) -> None:
        import domain.inventory as inventory

        await inventory.release(session, reservation_id, None, reason=reason, actor=actor, source="order")


DEFAULT_INVENTORY: InventoryPort = DomainInventory()
