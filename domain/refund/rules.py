"""Pure refund rules: the split policy over tenders."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TenderRoom:
    """What a tender can still give back: captured - refunded - pending elsewhere."""

    tender_id: str
    refundable_minor: int


def split_over_tenders(amount_minor: int, tenders: Sequence[TenderRoom]) -> list[tuple[str, int]] | None:
    """Allocates `amount_minor` over `tenders` in reverse capture order.

    `tenders` is in capture order (the order's payment list); the last one is
    refunded first, each up to its room. Returns [(tender_id, amount)] with
    positive amounts only, or None when the tenders cannot cover the amount.
    """
    if amount_minor < 0:
        raise ValueError("amount must not be negative")
    left = amount_minor
    out: list[tuple[str, int]] = []
    for t in reversed(tenders):
        if left == 0:
            break
        take = min(left, max(t.refundable_minor, 0))
        if take > 0:
            out.append((t.tender_id, take))
            left -= take
    return out if left == 0 else None


def idempotency_key(refund_id: str, tender_id: str) -> str:
    """Fixed per (refund, tender) at submission; never derived from an attempt."""
    return f"entrepot-refund:{refund_id}:{tender_id}"


def workflow_id(refund_id: str, attempt: int) -> str:
    """`refund-<id>` for the approval's execution, `refund-<id>-retry-<n>` for retries.

    Deterministic per execution attempt, so every start of one attempt (the
    servicer after commit, a client retry, the reconciler) names one workflow.
    """
    return f"refund-{refund_id}" if attempt <= 1 else f"refund-{refund_id}-retry-{attempt - 1}"
