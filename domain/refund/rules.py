"""The refund module's types and pure rules: what a request may ask for, what an
order still allows, and the split policy over tenders. No I/O here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from domain.shared.errors import FailedPrecondition, NotFound, PreconditionViolation, Violations
from domain.shared.money import Money

if TYPE_CHECKING:
    from domain.order import Order

PENDING_APPROVAL = "pending_approval"
DENIED = "denied"
EXECUTING = "executing"
COMPLETED = "completed"
FAULTED = "faulted"
STATES = (PENDING_APPROVAL, DENIED, EXECUTING, COMPLETED, FAULTED)
# States whose unrefunded tenders and unrecorded lines still hold refundable room.
OPEN_STATES = (PENDING_APPROVAL, EXECUTING, FAULTED)

MAX_REASON = 500
MAX_LINES = 500


@dataclass(frozen=True)
class LineInput:
    line_id: str
    quantity: int


@dataclass(frozen=True)
class RefundLine:
    line_id: str
    sku: str
    quantity: int
    amount_minor: int


@dataclass(frozen=True)
class RefundTender:
    tender_id: str
    seq: int
    method: str
    gateway_reference: str
    amount_minor: int
    state: str
    idempotency_key: str
    gateway_refund_id: str
    attempts: int
    refunded_at: datetime | None


@dataclass(frozen=True)
class Refund:
    id: str
    order_id: str
    channel: str
    customer_ref: str
    state: str
    currency: str
    amount_minor: int
    reason: str
    restock: bool
    restock_warehouse_code: str
    lines: tuple[RefundLine, ...]
    tenders: tuple[RefundTender, ...]
    requested_by: str
    decided_by: str
    decision_note: str
    execution_attempt: int
    fault_message: str
    created_at: datetime
    decided_at: datetime | None
    completed_at: datetime | None

    @property
    def amount(self) -> Money:
        return Money(self.currency, self.amount_minor)

    @property
    def workflow_id(self) -> str:
        return workflow_id(self.id, self.execution_attempt) if self.execution_attempt else ""


@dataclass(frozen=True)
class WorkflowFault:
    id: int
    channel: str
    workflow_id: str
    subject_type: str
    subject_id: str
    step: str
    error_type: str
    message: str
    created_at: datetime
    resolved_at: datetime | None


@dataclass(frozen=True)
class Held:
    """What open refunds of an order hold and have not recorded on it yet:
    amounts per tender and quantities per line."""

    tenders: Mapping[str, int]
    lines: Mapping[str, int]


def refund_not_found(refund_id: str) -> NotFound:
    return NotFound(
        "REFUND_NOT_FOUND", f"refund {refund_id!r} does not exist", metadata={"refund_id": refund_id}
    )


# ---------------------------------------------------------------- submission


def check_request(
    *,
    currency: str,
    order_id: str,
    lines: Sequence[LineInput],
    amount: Money | None,
    reason: str,
    restock: bool,
    restock_warehouse_code: str,
) -> Violations:
    """The request's own fields, before anything is read; `currency` is the channel's."""
    v = Violations()
    if not order_id:
        v.add("order_id", "is required")
    if not reason.strip():
        v.add("reason", "is required")
    elif len(reason) > MAX_REASON:
        v.add("reason", f"must be at most {MAX_REASON} characters")
    if len(lines) > MAX_LINES:
        v.add("lines", f"at most {MAX_LINES} lines")
    seen: set[str] = set()
    for i, li in enumerate(lines):
        if not li.line_id:
            v.add(f"lines[{i}].line_id", "is required")
        elif li.line_id in seen:
            v.add(f"lines[{i}].line_id", "appears twice; give each line once")
        seen.add(li.line_id)
        if li.quantity <= 0:
            v.add(f"lines[{i}].quantity", "must be positive")
    if amount is not None:
        if amount.currency != currency:
            v.add("amount.currency_code", f"must be the channel's currency {currency}")
        if amount.amount_minor < 0:
            v.add("amount.amount_minor", "must not be negative")
    if not lines and amount is None:
        v.add("lines", "give lines and quantities, an amount, or both")
    if restock and not lines:
        v.add("restock", "restocking needs lines")
    if restock and not restock_warehouse_code:
        v.add("restock_warehouse_code", "is required when restock is set")
    return v


def check_decision(approve: bool, note: str) -> Violations:
    v = Violations()
    if len(note) > MAX_REASON:
        v.add("note", f"must be at most {MAX_REASON} characters")
    if not approve and not note.strip():
        v.add("note", "a denial needs a note")
    return v


def lines_to_refund(
    order: Order, lines: Sequence[LineInput], held: Held
) -> tuple[list[RefundLine], list[PreconditionViolation]]:
    """The refund's lines priced from the order, and the lines asking more than is
    left to refund. Raises INVALID_ARGUMENT for a line the order does not have."""
    v = Violations()
    by_line = {li.line_id: li for li in order.lines}
    over: list[PreconditionViolation] = []
    out: list[RefundLine] = []
    for i, li in enumerate(lines):
        ol = by_line.get(li.line_id)
        if ol is None:
            v.add(f"lines[{i}].line_id", f"order {order.id} has no line {li.line_id!r}")
            continue
        room = ol.quantity - ol.refunded_quantity - held.lines.get(li.line_id, 0)
        if li.quantity > room:
            over.append(
                PreconditionViolation(
                    "REFUND_EXCEEDS_REFUNDABLE",
                    f"orders/{order.id}/lines/{li.line_id}",
                    f"{li.quantity} asked, {max(room, 0)} refundable",
                )
            )
        out.append(RefundLine(li.line_id, ol.sku, li.quantity, ol.unit_price.amount_minor * li.quantity))
    v.raise_if_any("the refund request is invalid")
    return out, over


def split_over_order(
    order: Order, total_minor: int, held: Held
) -> tuple[list[tuple[str, int]] | None, list[PreconditionViolation]]:
    """`split_over_tenders` over what each of the order's tenders can still give
    back; None and the tenders' rooms when they cannot cover `total_minor`."""
    rooms = [
        TenderRoom(
            p.tender_id,
            p.captured.amount_minor - p.refunded.amount_minor - held.tenders.get(p.tender_id, 0),
        )
        for p in order.payments
    ]
    split = split_over_tenders(total_minor, rooms)
    if split is not None:
        return split, []
    refundable = sum(max(r.refundable_minor, 0) for r in rooms)
    return None, [
        PreconditionViolation(
            "REFUND_EXCEEDS_REFUNDABLE",
            f"orders/{order.id}",
            f"{total_minor} asked, {refundable} refundable over all tenders",
        ),
        *(
            PreconditionViolation(
                "TENDER_REFUNDABLE",
                f"orders/{order.id}/payments/{r.tender_id}",
                f"{max(r.refundable_minor, 0)} refundable",
            )
            for r in rooms
        ),
    ]


def refuse_excess(order_id: str, over: Sequence[PreconditionViolation]) -> None:
    if over:
        raise FailedPrecondition(
            "REFUND_EXCEEDS_REFUNDABLE",
            "the refund exceeds what is refundable",
            metadata={"order_id": order_id},
            precondition_violations=list(over),
        )


# ---------------------------------------------------------------- tenders and ids


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
