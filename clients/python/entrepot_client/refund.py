"""Helpers for RefundService on top of the generated `RefundClient` (`Entrepot(...).refund`).

from entrepot_client.refund import wait_for_refund

refund = await wait_for_refund(ep.refund, refund_id, timeout=60)   # COMPLETED, FAULTED or DENIED
"""

from __future__ import annotations

import asyncio
import time

from entrepot.refund.v1 import refund_pb2
from entrepot_client._services import RefundClient

__all__ = ["TERMINAL_STATES", "wait_for_refund"]

R = refund_pb2.Refund
TERMINAL_STATES = frozenset({R.STATE_COMPLETED, R.STATE_FAULTED, R.STATE_DENIED})


async def wait_for_refund(
    client: RefundClient, refund_id: str, *, timeout: float = 60.0, interval: float = 0.25
) -> refund_pb2.Refund:
    """Polls GetRefund until the refund leaves PENDING_APPROVAL / EXECUTING for a final
    state (FAULTED counts: a person decides whether to retry). Raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        refund = await client.get_refund(refund_pb2.GetRefundRequest(refund_id=refund_id))
        if refund.state in TERMINAL_STATES:
            return refund
        if time.monotonic() >= deadline:
            raise TimeoutError(f"refund {refund_id} is still {R.State.Name(refund.state)}")
        await asyncio.sleep(interval)
