"""Intent audit: re-deriving each order's canonical content from its stored
intent and comparing it with the order as stored (`entrepot orders verify`).

An order keeps the canonical content of the intent it was created from
(`content`, with its sha256 `content_hash`). The audit reads that intent back
(rules.intent_of_content), derives the canonical content again, and reports
every place where the content, its hash, or the order's own columns, lines
and payments say something else.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from domain.order.models import OrderLineRow, OrderRow, PaymentRow
from domain.order.rules import canonical_content, content_hash, differing_fields, intent_of_content
from domain.order.store import orders

AUDIT_PAGE = 200


@dataclass(frozen=True)
class Difference:
    order_id: str
    field: str
    stored: str
    derived: str

    def __str__(self) -> str:
        return f"order {self.order_id}: {self.field}: stored {self.stored}, intent says {self.derived}"


@dataclass(frozen=True)
class AuditPage:
    checked: int
    differences: list[Difference]
    # Where the next page starts, or None after the last one.
    after: tuple[datetime, uuid.UUID] | None


async def audit_page(
    session: AsyncSession,
    *,
    channel: str | None,
    since: datetime | None,
    after: tuple[datetime, uuid.UUID] | None,
    size: int = AUDIT_PAGE,
) -> AuditPage:
    """Audits up to `size` orders (of `channel`, created at or after `since`), oldest first after `after`."""
    page, more = await orders.oldest_rows(session, channel=channel, since=since, after=after, size=size)
    found: list[Difference] = []
    for row, lines, pays in page:
        found.extend(differences(row, lines, pays))
    last = page[-1][0] if page else None
    return AuditPage(len(page), found, (last.created_at, last.id) if more and last else None)


def differences(row: OrderRow, lines: Sequence[OrderLineRow], pays: Sequence[PaymentRow]) -> list[Difference]:
    """Every difference between the order as stored and what its intent says."""
    oid = str(row.id)
    try:
        intent = intent_of_content(row.content)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        return [Difference(oid, "content", "an unreadable intent", f"nothing ({type(err).__name__}: {err})")]
    derived = canonical_content(intent, str(row.content.get("channel", "")))
    out = [
        Difference(oid, path, "content as stored", "another value when derived again")
        for path in differing_fields(row.content, derived)
    ]
    if content_hash(derived) != row.content_hash:
        out.append(Difference(oid, "content_hash", row.content_hash.hex(), content_hash(derived).hex()))
    t = intent.totals
    expected: list[tuple[str, Any, Any]] = [
        ("channel", row.channel, derived["channel"]),
        ("source_system", row.source_system, intent.source_system),
        ("intent_id", row.intent_id, intent.intent_id),
        ("external_order_id", row.external_order_id, intent.external_order_id),
        ("customer_ref", row.customer_ref, intent.customer_ref),
        ("currency", row.currency, t.grand_total.currency),
        ("totals.subtotal", row.subtotal_minor, t.subtotal.amount_minor),
        ("totals.tax", row.tax_minor, t.tax.amount_minor),
        ("totals.shipping", row.shipping_minor, t.shipping.amount_minor),
        ("totals.discount", row.discount_minor, t.discount.amount_minor),
        ("totals.grand_total", row.grand_total_minor, t.grand_total.amount_minor),
        ("reissued_from_order_id", str(row.reissued_from_order_id or ""), intent.reissued_from),
        ("reissue_reason", row.reissue_reason, intent.reissue_reason),
        ("lines", len(lines), len(intent.lines)),
        ("payments", len(pays), len(intent.payments)),
    ]
    if intent.submitted_at is not None:
        expected.append(("submit_time", row.submitted_at, intent.submitted_at))
    for i, (li, want) in enumerate(zip(lines, intent.lines, strict=False)):
        expected += [
            (f"lines[{i}].line_id", li.line_id, want.line_id),
            (f"lines[{i}].sku", li.sku, want.sku),
            (f"lines[{i}].quantity", li.quantity, want.quantity),
            (f"lines[{i}].unit_price", li.unit_price_minor, want.unit_price.amount_minor),
        ]
    for i, (p, want_p) in enumerate(zip(pays, intent.payments, strict=False)):
        expected += [
            (f"payments[{i}].tender_id", p.tender_id, want_p.tender_id),
            (f"payments[{i}].method", p.method, want_p.method),
            (f"payments[{i}].captured", p.captured_minor, want_p.captured.amount_minor),
            (f"payments[{i}].gateway_reference", p.gateway_reference, want_p.gateway_reference),
        ]
    out += [Difference(oid, name, repr(s), repr(d)) for name, s, d in expected if s != d]
    return out
