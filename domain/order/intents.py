"""SubmitOrderIntent: the canonical order of an intent, created once per intent key."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from domain.order.inventory_port import DEFAULT_INVENTORY, InventoryPort
from domain.order.reserving import reservation_entry, sum_by_sku
from domain.order.rules import (
    Intent,
    State,
    canonical_content,
    content_hash,
    differing_fields,
    validate_intent,
)
from domain.order.store import entries, orders
from domain.order.types import CREATED, Line, Order, SubmitResult, Tender, Totals
from domain.platform import idempotency
from domain.shared.caller import ChannelRef
from domain.shared.errors import AlreadyExists, FieldViolation, InvalidArgument
from domain.shared.ids import new_id
from domain.shared.money import Money
from domain.shared.outbox import Event


async def submit_intent(
    session: AsyncSession,
    intent: Intent,
    *,
    channel: ChannelRef,
    actor: str,
    reserve_inventory: bool = False,
    reservation_id: str | None = None,
    reservation_backordered: bool = False,
    inventory: InventoryPort = DEFAULT_INVENTORY,
    claim: idempotency.Claim | None = None,
    respond: Callable[[SubmitResult], bytes] | None = None,
) -> SubmitResult:
    """Creates the canonical order for an intent, or returns the one it already created.

    `reservation_id` adopts a reservation the caller already holds for these
    lines (a cart's hold turned into the order's; `reservation_backordered`
    when it holds backordered units); `reserve_inventory` reserves now. Both
    happen in the caller's transaction.

    `claim` (with `reserve_inventory` only): the RPC's idempotency claim, made
    by the reservation's first statement (see idempotency.Claim); KeyTaken
    when its request_id was used before. `respond`: the RPC's response to a
    result, as bytes, stored as the claim's answer by the reservation's write
    (Claim.answers) when the order is created.
    """
    validate_intent(intent, channel.currency)
    _check_one_reservation_source(reserve_inventory, reservation_id)
    if claim is not None and not reserve_inventory:
        raise ValueError(
            "the idempotency claim is made by the reservation's statement: reserve_inventory only"
        )
    content = canonical_content(intent, channel.slug)
    digest = content_hash(content)
    head = entries.OrderHead(new_id(), channel.slug)
    specs = _submitted_entries(intent, channel, actor, adopted_reservation=reservation_id)
    reserved_id = reservation_id
    at_risk = bool(reservation_id) and reservation_backordered
    pending = None
    if reserve_inventory:
        # Planned first (its levels locked, the claim made), written after the order:
        # the order is inserted with its reservation and that entry, no update after.
        demand = sum_by_sku([(li.sku, li.quantity) for li in intent.lines])
        pending = await inventory.reserve_pending(
            session, demand, reference=f"order:{head.id}", actor=actor, channel=head.channel, claim=claim
        )
        if pending.reserved is not None:
            specs.append(reservation_entry(demand, pending.reserved, actor))
            reserved_id = pending.reserved.reservation_id
            at_risk = bool(pending.reserved.backordered)
    # The order, its lines, payments, entries and events in one statement (checkout
    # holds locks meanwhile). A clash on the intent key or on the external id
    # both end here; the loser waits for the winner's commit, then sees its row.
    inserted = await entries.insert_intent(
        session,
        head,
        intent,
        channel=channel,
        content=content,
        digest=digest,
        reservation_id=reserved_id,
        inventory_risk=at_risk,
        specs=specs,
        before=[created_event(head)],
    )
    if inserted is None:
        # An equal intent's order, even when the stock it would reserve now is gone.
        return await _existing_intent(session, intent, channel, content, digest)
    # Every write of this transaction stamps now(): the reservation's too.
    order = new_order(
        head,
        intent,
        channel,
        submitted_at=inserted["submitted_at"],
        created_at=inserted["created_at"],
        updated_at=inserted["updated_at"],
        reservation_id=reserved_id,
        inventory_risk=at_risk,
    )
    result = SubmitResult(order, created=True)
    if pending is not None:
        if pending.refusal is not None:
            raise pending.refusal
        # The last statement: it stores the RPC's answer too.
        await pending.write(
            claim.answers(respond(result))
            if claim is not None and respond is not None
            else idempotency.Answers()
        )
    return result


def _check_one_reservation_source(reserve_inventory: bool, reservation_id: str | None) -> None:
    if reserve_inventory and reservation_id:
        raise InvalidArgument(
            "INVALID_ORDER_INTENT",
            "reserve_inventory and an existing reservation are exclusive",
            field_violations=[
                FieldViolation("reserve_inventory", "must be false when adopting a reservation")
            ],
        )


def _submitted_entries(
    intent: Intent, channel: ChannelRef, actor: str, *, adopted_reservation: str | None
) -> list[entries.EntrySpec]:
    """order:submitted, then inventory:reservation_confirmed when a reservation is adopted."""
    specs = [
        entries.EntrySpec(
            "order:submitted",
            actor,
            category="lifecycle",
            payload={
                "source_system": intent.source_system,
                "intent_id": intent.intent_id,
                "external_order_id": intent.external_order_id,
                "grand_total_minor": intent.totals.grand_total.amount_minor,
                "currency": channel.currency,
            },
        )
    ]
    if adopted_reservation:
        specs.append(
            entries.EntrySpec(
                "inventory:reservation_confirmed",
                actor,
                category="inventory",
                payload={"reservation_id": adopted_reservation, "adopted": True},
            )
        )
    return specs


def created_event(head: entries.OrderHead) -> Event:
    return Event(
        CREATED,
        "order",
        str(head.id),
        {"order_id": str(head.id), "state": State.PENDING.value},
        head.channel,
    )


def new_order(
    head: entries.OrderHead,
    intent: Intent,
    channel: ChannelRef,
    *,
    submitted_at: datetime,
    created_at: datetime,
    updated_at: datetime,
    reservation_id: str | None,
    inventory_risk: bool,
) -> Order:
    """The order just inserted, built from what was written (nothing is read back)."""
    currency = channel.currency
    t = intent.totals
    return Order(
        id=str(head.id),
        channel=channel.slug,
        source_system=intent.source_system,
        intent_id=intent.intent_id,
        external_order_id=intent.external_order_id,
        customer_ref=intent.customer_ref,
        currency=currency,
        state=State.PENDING,
        lines=tuple(Line(li.line_id, li.sku, li.quantity, li.unit_price, 0, 0) for li in intent.lines),
        totals=Totals(t.subtotal, t.tax, t.shipping, t.discount, t.grand_total),
        payments=tuple(
            Tender(p.tender_id, p.method, p.captured, p.gateway_reference, Money(currency, 0))
            for p in intent.payments
        ),
        submitted_at=submitted_at,
        created_at=created_at,
        updated_at=updated_at,
        reservation_id=reservation_id,
        blocked=False,
        inventory_risk=inventory_risk,
    )


async def _existing_intent(
    session: AsyncSession, intent: Intent, channel: ChannelRef, content: dict[str, Any], digest: bytes
) -> SubmitResult:
    """The order an equal intent created before; ALREADY_EXISTS when the key or
    the external id is held by other content."""
    row = await orders.row_by_intent(session, intent.source_system, intent.intent_id)
    if row is None:
        raise AlreadyExists(
            "EXTERNAL_ORDER_ID_TAKEN",
            f"another intent of {intent.source_system!r} already created order {intent.external_order_id!r}",
            metadata={"source_system": intent.source_system, "external_order_id": intent.external_order_id},
            field_violations=[FieldViolation("intent.external_order_id", "already used by another intent")],
        )
    if row.content_hash == digest:
        return SubmitResult(await orders.load(session, row), created=False)
    # Never describe another channel's order beyond the fact that the key is taken.
    diff = ["intent.channel"] if row.channel != channel.slug else differing_fields(row.content, content)
    raise AlreadyExists(
        "INTENT_CONFLICT",
        f"intent {intent.intent_id!r} of {intent.source_system!r} was already accepted with different content",
        metadata={
            "source_system": intent.source_system,
            "intent_id": intent.intent_id,
            "differing_fields": ",".join(diff),
            **({"order_id": str(row.id)} if row.channel == channel.slug else {}),
        },
        field_violations=[
            FieldViolation(p, "differs from the intent already accepted under this key") for p in diff
        ],
    )
