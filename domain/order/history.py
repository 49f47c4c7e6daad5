"""An order's status history: appending, closing and reading entries."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from domain.order.rules import State, StatusIn, validate_status
from domain.order.store import entries, orders
from domain.order.types import StatusEntry, StatusSummary
from domain.shared.caller import Caller
from domain.shared.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from domain.shared.pagination import decode_token, encode_token, page_size


async def append_status(
    session: AsyncSession, order_id: str, entry: StatusIn, *, channel: str, caller: Caller
) -> StatusEntry:
    validate_status(entry, caller.status_namespaces)
    # The order lock orders a BLOCKING append against a concurrent shipment.
    row = await orders.order_row(session, order_id, channel, lock=True)
    spec = entries.EntrySpec(
        entry.code, caller.subject, entry.severity, entry.category, entry.payload, entry.recorded_at
    )
    return await entries.append_entry(session, row, spec)


async def close_status(
    session: AsyncSession, order_id: str, entry_id: int, note: str, *, channel: str, caller: Caller
) -> StatusEntry:
    row = await orders.order_row(session, order_id, channel, lock=True)
    entry = await entries.entry_for_update(session, row.id, entry_id)
    if entry is None:
        raise NotFound(
            "STATUS_ENTRY_NOT_FOUND",
            f"order {order_id} has no status entry {entry_id}",
            metadata={"order_id": order_id, "entry_id": str(entry_id)},
        )
    # Closing follows the same namespace rule as writing.
    validate_status(StatusIn(code=entry.code), caller.status_namespaces)
    if entry.closed_at is not None:
        raise FailedPrecondition(
            "STATUS_ALREADY_CLOSED",
            f"status entry {entry_id} was already closed",
            metadata={"order_id": order_id, "entry_id": str(entry_id)},
        )
    if len(note) > 1000:
        raise InvalidArgument(
            "INVALID_ARGUMENT",
            "note is too long",
            field_violations=[FieldViolation("note", "at most 1000 characters")],
        )
    return await entries.close_entry(session, row, entry, closed_by=caller.subject, note=note)


async def list_status_history(
    session: AsyncSession, order_id: str, *, channel: str, module: str = "", size: int = 0, token: str = ""
) -> tuple[list[StatusEntry], str]:
    row = await orders.order_row(session, order_id, channel)
    n = page_size(size)
    filters = {"order": order_id, "module": module}
    after = decode_token(token, filters)
    page, more = await entries.history_page(
        session, row.id, module=module, after_id=None if after is None else int(after), size=n
    )
    return page, encode_token(page[-1].id, filters) if more else ""


async def status_summary(session: AsyncSession, order_id: str, *, channel: str) -> StatusSummary:
    row = await orders.order_row(session, order_id, channel)
    latest = await entries.latest_per_module(session, row.id)
    blocking = await entries.open_blocking(session, row.id)
    return StatusSummary(str(row.id), State(row.state), tuple(latest), tuple(blocking), row.inventory_risk)


async def record_manual_adjustment(
    session: AsyncSession, order_id: str, note: str, details: dict[str, Any], *, channel: str, actor: str
) -> StatusEntry:
    """A correction is recorded as `order:manually_adjusted`, never by rewriting the order."""
    if not note.strip():
        raise InvalidArgument(
            "INVALID_STATUS_ENTRY",
            "a manual adjustment needs a note",
            field_violations=[FieldViolation("note", "required")],
        )
    row = await orders.order_row(session, order_id, channel, lock=True)
    spec = entries.EntrySpec(
        "order:manually_adjusted", actor, category="correction", payload={"note": note, **details}
    )
    return await entries.append_entry(session, row, spec)
