"""The three inventory hooks orders need, behind a small protocol.

Order depends on Inventory only for reserve / fulfil / release, always with
the caller's session so stock and order change in one transaction. The
default implementation calls domain.inventory's public interface; tests of
pure order behaviour may pass another implementation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from domain.platform.idempotency import Answers, Claim
from domain.shared.errors import DomainError

if TYPE_CHECKING:
    import domain.inventory as inventory


@dataclass(frozen=True)
class StockLine:
    sku: str
    quantity: int


@dataclass(frozen=True)
class Reserved:
    reservation_id: str
    # Units per SKU that exceeded on_hand (the item allows backorders).
    backordered: dict[str, int]


@dataclass(frozen=True)
class PendingReservation:
    """A reservation planned (its stock levels locked), written by
    `write(answers)` with the RPC's idempotency answers (idempotency.Claim.answers;
    Answers() for none): what it will hold (`reserved`), or the refusal that
    stops it (`refusal`)."""

    reserved: Reserved | None
    refusal: DomainError | None
    write: Callable[[Answers], Awaitable[None]]


class InventoryPort(Protocol):
    async def reserve_pending(
        self,
        session: AsyncSession,
        lines: Sequence[StockLine],
        *,
        reference: str,
        actor: str,
        channel: str = "",
        claim: Claim | None = None,
    ) -> PendingReservation:
        """`reserve` in two steps, so the caller writes its own rows between the
        plan and the write (SubmitOrderIntent: the order carries its reservation
        from its first row). `claim`: the RPC's idempotency claim, made by the
        plan's statement before it locks anything (KeyTaken when its key was used before)."""
        ...

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

    async def reserve_pending(
        self,
        session: AsyncSession,
        lines: Sequence[StockLine],
        *,
        reference: str,
        actor: str,
        channel: str = "",
        claim: Claim | None = None,
    ) -> PendingReservation:
        import domain.inventory as inventory

        request = inventory.reserve_request(
            [inventory.LineRequest(sku=li.sku, quantity=li.quantity) for li in lines],
            reference=reference,
            ttl=None,
            actor=actor,
            source="order",
            channel=channel,
        )
        prepared = await inventory.prepare_reserve(session, request, claim)

        (outcome,) = prepared.results
        if isinstance(outcome, DomainError):
            return PendingReservation(None, outcome, prepared.write)
        assert outcome is not None  # a claimed key (prepare_reserve raised KeyTaken otherwise)
        return PendingReservation(_reserved(outcome), None, prepared.write)

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
        return _reserved(res)

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


def _reserved(res: inventory.Reservation) -> Reserved:
    """What an inventory.Reservation means to an order."""
    backordered: dict[str, int] = {}
    for line in res.lines:
        if line.backordered:
            backordered[line.sku] = backordered.get(line.sku, 0) + line.backordered
    return Reserved(reservation_id=str(res.id), backordered=backordered)


DEFAULT_INVENTORY: InventoryPort = DomainInventory()
