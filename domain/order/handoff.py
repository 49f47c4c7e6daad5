"""AcknowledgeOrderHandoff: the system that took an order over (an ERP, a WMS)
records its reference on the order, once."""

from __future__ import annotations

from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncSession

from domain.order.rules import ID_TEXT, StatusIn, validate_status
from domain.order.store import entries, orders
from domain.order.types import Order
from domain.shared.caller import Caller
from domain.shared.errors import FailedPrecondition, Violations


async def acknowledge_handoff(
    session: AsyncSession,
    order_id: str,
    external_reference: str,
    module: str,
    *,
    channel: str,
    caller: Caller,
) -> Order:
    """Sets the handoff reference and time with a `<module>:handoff_acknowledged`
    entry. The same reference again changes nothing; another is HANDOFF_ALREADY_ACKNOWLEDGED."""
    namespace = _namespace(external_reference, module, caller)
    code = f"{namespace}:handoff_acknowledged"
    validate_status(StatusIn(code=code), caller.status_namespaces)
    # The order's lock makes the first acknowledgement win; the others see it.
    row = await orders.order_row(session, order_id, channel, lock=True)
    if row.external_handoff_reference == external_reference:
        return await orders.load(session, row)
    if row.external_handoff_reference is not None:
        raise FailedPrecondition(
            "HANDOFF_ALREADY_ACKNOWLEDGED",
            f"order {order_id} was already acknowledged with another reference",
            metadata={"order_id": order_id, "external_reference": row.external_handoff_reference},
        )
    await orders.update_order(
        session,
        row,
        external_handoff_reference=external_reference,
        external_handoff_acknowledged_at=func.now(),
    )
    await entries.append_entry(
        session,
        row,
        entries.EntrySpec(
            code, caller.subject, category="handoff", payload={"external_reference": external_reference}
        ),
    )
    return await orders.load(session, row)


def _namespace(external_reference: str, module: str, caller: Caller) -> str:
    """The entry's namespace: `module`, or the caller's only one when not given."""
    v = Violations()
    if not ID_TEXT.match(external_reference):
        v.add("external_reference", "must be 1 to 128 printable ASCII characters without spaces")
    own = sorted(ns for ns in caller.status_namespaces if ns != "*")
    if not module and len(own) != 1:
        v.add("module", "is required unless the token lists exactly one status namespace")
    v.raise_if_any("the acknowledgement is invalid")
    return module or own[0]
