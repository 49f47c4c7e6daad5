"""ReissueOrder: a new order made from an existing one (a replacement shipment),
linked both ways, reserving like any order, the original left as it was."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from domain.order.intents import created_event
from domain.order.inventory_port import DEFAULT_INVENTORY, InventoryPort
from domain.order.models import OrderLineRow
from domain.order.reserving import reserve_new
from domain.order.rules import Intent, LineIn, TotalsIn, canonical_content, content_hash, validate_intent
from domain.order.store import entries, orders
from domain.order.types import Order
from domain.shared.caller import ChannelRef
from domain.shared.errors import Violations
from domain.shared.ids import new_id
from domain.shared.money import Money

# The intent key of a reissue: this source system, intent id "<original id>:<n>".
REISSUE_SOURCE = "entrepot-reissue"


async def reissue_order(
    session: AsyncSession,
    order_id: str,
    *,
    channel: ChannelRef,
    reason: str,
    lines: Sequence[tuple[str, int]],
    keep_unit_prices: bool,
    actor: str,
    inventory: InventoryPort = DEFAULT_INVENTORY,
) -> Order:
    """Creates the reissue of `order_id` ((line_id, quantity) pairs; empty: every
    line in full), zero-priced unless `keep_unit_prices`, and reserves its stock."""
    _check_reason(reason)
    # The original's lock orders reissues of one order, so their numbers never clash.
    original = await orders.order_row(session, order_id, channel.slug, lock=True)
    picked = _pick_lines(await orders.order_lines(session, original.id), lines)
    number = await orders.reissue_count(session, original.id) + 1
    intent = _reissue_intent(
        original.id, number, original.customer_ref, picked, channel.currency, reason, keep_unit_prices
    )
    validate_intent(intent, channel.currency)
    content = canonical_content(intent, channel.slug)
    head = entries.OrderHead(new_id(), channel.slug)
    inserted = await entries.insert_intent(
        session,
        head,
        intent,
        channel=channel,
        content=content,
        digest=content_hash(content),
        reservation_id=None,
        inventory_risk=False,
        specs=[
            entries.EntrySpec(
                "order:reissue_of",
                actor,
                category="lifecycle",
                payload={"original_order_id": str(original.id), "reason": reason},
            )
        ],
        before=[created_event(head)],
    )
    if inserted is None:  # pragma: no cover - the original's lock makes the key unique
        raise RuntimeError(f"reissue {intent.intent_id} already exists")
    await reserve_new(
        session, head, [(li.sku, li.quantity) for li in intent.lines], actor=actor, inventory=inventory
    )
    await entries.append_entry(
        session,
        original,
        entries.EntrySpec(
            "order:reissued",
            actor,
            category="lifecycle",
            payload={
                "reissue_order_id": str(head.id),
                "reason": reason,
                "lines": [{"line_id": li.line_id, "quantity": li.quantity} for li in intent.lines],
            },
        ),
    )
    # Read back: the reservation's risk flag and the link are what GetOrder shows.
    return await orders.load(session, await orders.order_row(session, str(head.id), channel.slug))


def _check_reason(reason: str) -> None:
    v = Violations()
    if not reason.strip():
        v.add("reason", "is required")
    elif len(reason) > 1000:
        v.add("reason", "at most 1000 characters")
    v.raise_if_any("the reissue is invalid")


def _pick_lines(
    original: list[OrderLineRow], wanted: Sequence[tuple[str, int]]
) -> list[tuple[OrderLineRow, int]]:
    """The original's lines to reissue with their quantities (all of them when `wanted` is empty)."""
    if not wanted:
        return [(li, li.quantity) for li in original]
    by_id = {li.line_id: li for li in original}
    v = Violations()
    seen: set[str] = set()
    picked: list[tuple[OrderLineRow, int]] = []
    for i, (line_id, qty) in enumerate(wanted):
        line = by_id.get(line_id)
        if line is None:
            v.add(f"lines[{i}].line_id", f"the order has no line {line_id!r}")
        elif line_id in seen:
            v.add(f"lines[{i}].line_id", f"line {line_id!r} appears twice")
        elif not 0 < qty <= line.quantity:
            v.add(f"lines[{i}].quantity", f"must be between 1 and the ordered quantity {line.quantity}")
        else:
            picked.append((line, qty))
        seen.add(line_id)
    v.raise_if_any("the reissue is invalid")
    return picked


def _reissue_intent(
    original_id: uuid.UUID,
    number: int,
    customer_ref: str,
    picked: list[tuple[OrderLineRow, int]],
    currency: str,
    reason: str,
    keep_unit_prices: bool,
) -> Intent:
    """Zero-priced unless `keep_unit_prices` (then grand total = subtotal); never any payments."""
    lines = tuple(
        LineIn(li.line_id, li.sku, qty, Money(currency, li.unit_price_minor if keep_unit_prices else 0))
        for li, qty in picked
    )
    subtotal = Money(currency, sum(x.quantity * x.unit_price.amount_minor for x in lines))
    zero = Money(currency, 0)
    return Intent(
        intent_id=f"{original_id}:{number}",
        source_system=REISSUE_SOURCE,
        lines=lines,
        totals=TotalsIn(subtotal, zero, zero, zero, subtotal),
        customer_ref=customer_ref,
        reissued_from=str(original_id),
        reissue_reason=reason,
    )
