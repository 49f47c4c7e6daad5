"""Reading orders: by id, by external id, and the keyset-paginated list."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from domain.order.store import orders
from domain.order.types import Order, OrderFilter
from domain.shared.errors import FieldViolation, InvalidArgument, NotFound, Violations
from domain.shared.pagination import decode_token, encode_token, page_size

# Longer than any order's life; keeps `now() - age` inside PostgreSQL's timestamp range.
MAX_HANDOFF_AGE = timedelta(days=3660)


async def get_order(session: AsyncSession, order_id: str, *, channel: str | None) -> Order:
    """The order; `channel=None` only for trusted internal callers (workflows)."""
    return await orders.load(session, await orders.order_row(session, order_id, channel))


async def get_order_by_external_id(
    session: AsyncSession, source_system: str, external_order_id: str, *, channel: str
) -> Order:
    if not source_system or not external_order_id:
        v = Violations()
        if not source_system:
            v.add("source_system", "is required")
        if not external_order_id:
            v.add("external_order_id", "is required")
        v.raise_if_any("source_system and external_order_id are required")
    row = await orders.row_by_external_id(session, channel, source_system, external_order_id)
    if row is None:
        raise NotFound(
            "ORDER_NOT_FOUND",
            f"no order {external_order_id!r} from {source_system!r}",
            metadata={"source_system": source_system, "external_order_id": external_order_id},
        )
    return await orders.load(session, row)


async def list_orders(
    session: AsyncSession, *, channel: str, filters: OrderFilter, size: int, token: str
) -> tuple[list[Order], str]:
    """Newest first, keyset-paginated on (created_at, id)."""
    n = page_size(size)
    age = filters.handoff_unacknowledged_for
    if age is not None and age > MAX_HANDOFF_AGE:
        raise InvalidArgument(
            "INVALID_ARGUMENT",
            "handoff_unacknowledged_for is too long",
            field_violations=[FieldViolation("handoff_unacknowledged_for", "at most 3660 days")],
        )
    fingerprint = {
        "channel": channel,
        "states": sorted(s.value for s in filters.states),
        "customer_ref": filters.customer_ref,
        "source_system": filters.source_system,
        "start": filters.start.isoformat() if filters.start else None,
        "end": filters.end.isoformat() if filters.end else None,
        "blocked": filters.blocked_only,
        "risk": filters.inventory_risk_only,
        "unacknowledged_for": filters.handoff_unacknowledged_for.total_seconds()
        if filters.handoff_unacknowledged_for
        else None,
    }
    after = decode_token(token, fingerprint)
    before: tuple[datetime, uuid.UUID] | None = None
    if after is not None:
        try:
            before = datetime.fromisoformat(after[0]), uuid.UUID(after[1])
        except (ValueError, TypeError, IndexError) as exc:
            raise InvalidArgument(
                "INVALID_PAGE_TOKEN", "page_token is not a token this service issued"
            ) from exc
    page, more = await orders.newest_orders(session, channel=channel, filters=filters, before=before, size=n)
    if not page:
        return [], ""
    last = page[-1]
    return page, encode_token([last.created_at.isoformat(), last.id], fingerprint) if more else ""
