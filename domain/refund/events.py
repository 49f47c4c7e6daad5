"""What a refund tells others: its outbox events and the history entries it
writes on its order (under the refund module's own status namespace)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

import domain.order as orders
from domain.refund.rules import Refund
from domain.shared.caller import Caller
from domain.shared.outbox import Event, emit

# History entries are written by the refund module under its own namespace.
REFUND_WRITER = Caller(subject="system:refunds", status_namespaces=frozenset({"refund"}))

TOPIC_SUBMITTED = "refund.submitted"
TOPIC_APPROVED = "refund.approved"
TOPIC_DENIED = "refund.denied"
TOPIC_TENDER_REFUNDED = "refund.tender_refunded"
TOPIC_COMPLETED = "refund.completed"
TOPIC_FAULTED = "refund.faulted"
TOPIC_RETRIED = "refund.retried"


async def append_history(
    session: AsyncSession,
    refund: Refund,
    code: str,
    payload: dict[str, Any],
    *,
    severity: orders.Severity = orders.Severity.INFO,
) -> None:
    """A status entry on the refund's order (category `refund`)."""
    await orders.append_status(
        session,
        refund.order_id,
        orders.StatusIn(
            code=code, severity=severity, category="refund", payload={"refund_id": refund.id, **payload}
        ),
        channel=refund.channel,
        caller=REFUND_WRITER,
    )


async def emit_event(session: AsyncSession, refund: Refund, topic: str, payload: dict[str, Any]) -> None:
    """An outbox event about the refund, carrying its order and state."""
    await emit(
        session,
        Event(
            topic=topic,
            aggregate_type="refund",
            aggregate_id=refund.id,
            channel=refund.channel,
            payload={"order_id": refund.order_id, "state": refund.state, **payload},
        ),
    )
