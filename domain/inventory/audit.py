"""Stock audit and repair: find where a level's counters disagree with what they
derive from, and fix a drift through the ledger.

The invariants (true by construction; operators' direct SQL, restored backups
and imports are what break them):
- on_hand = the sum of the level's ledger on_hand deltas;
- reserved = the open quantity of the active reservations' tracked lines;
- the lots' remaining units <= on_hand (negative adjustments and counts do not
  consume lots, so this one also reports lots that outlived the units).

What a repair means, per kind (each writes ONE `audit` ledger movement and its
stock_changed event, in the transaction of the guarded change, the level row
locked; reason, actor and the figures found are on the movement):
- on_hand: the counter is what every call has been served and guarded against,
  so the movement records the change nobody recorded (before = the ledger's
  figure, after = the counter): the ledger sums to on_hand again and watchers
  that follow deltas catch up. A wrong physical figure is then a normal SetStock.
- reserved: the reservations are the truth; reserved := their open quantity
  (guarded on the value found), the movement going from the ledger's reserved
  figure to it, so the ledger's reserved deltas sum to the counter too.
- lots: the excess units are written off the oldest lots first (the FIFO order
  of fulfilment), recorded as lot consumptions of the movement; counters unchanged.
A repair refuses (STOCK_CHANGED) when the figures are not the ones the caller
audited, and does nothing when the drift is gone (so repeating one is a no-op).

The ledger's sums come from per-level checkpoints (inventory.ledger_checkpoints:
the sums through a ledger id) plus the level's later rows, so an audit reads what
was written since the last one, not the whole history. Only the audit job
(`checkpointing_audit`) and repairs write checkpoints; the job re-sums a level's
whole ledger once its last full re-sum is older than the age given, and `whole_ledger`
ignores checkpoints (an edit of a ledger row below a checkpoint shows only then).
A repair always compares with the whole ledger, and records the sums its
movement closes as the level's checkpoint (audit_store says why that is safe).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.inventory import audit_store, ledger
from domain.inventory import reservation_store as holds
from domain.inventory import stock_store as store
from domain.inventory.types import Movement, StockLevel, is_below_threshold
from domain.inventory.validation import check_sku, check_text, check_warehouse_code
from domain.shared.errors import FailedPrecondition, NotFound, PreconditionViolation, Violations
from domain.shared.pagination import decode_token, encode_token, page_size
from domain.shared.uow import UnitOfWork

DRIFT_KINDS = audit_store.KINDS
MAX_AUDIT_SKUS = 1000
# Levels one AuditStock page may check: bounds the work of a call when drifts are rare.
SCAN_CHUNK = 500
SCAN_BUDGET = 4000


@dataclass(frozen=True)
class Drift:
    sku: str
    warehouse_code: str
    kind: str
    counter: int
    derived: int

    @property
    def difference(self) -> int:
        return self.counter - self.derived


@dataclass(frozen=True)
class AuditPage:
    drifts: list[Drift]
    next_token: str
    levels_checked: int


@dataclass(frozen=True)
class Repair:
    repaired: bool
    drift: Drift  # as found under the lock (difference 0 when it was gone)
    movement: Movement | None
    level: StockLevel


def _figure(row: Any, kind: str) -> Drift:
    """The counter of `kind` next to what it derives from (a drift when they disagree)."""
    if kind == "on_hand":
        counter, derived = int(row.on_hand), int(row.ledger_on_hand)
    elif kind == "reserved":
        counter, derived = int(row.reserved), int(row.open_reserved)
    else:
        counter, derived = int(row.lots_remaining), int(row.on_hand)
    return Drift(row.sku, row.warehouse_code, kind, counter, derived)


def _drifts(row: Any, kinds: Sequence[str]) -> list[Drift]:
    """The drifts of `kinds` in a row of audit_store (which decides what drifts)."""
    return [_figure(row, kind) for kind in kinds if getattr(row, f"{kind}_drifts")]


def _check_kinds(v: Violations, field_path: str, kinds: Sequence[str]) -> None:
    for i, k in enumerate(kinds):
        if k not in DRIFT_KINDS:
            v.add(f"{field_path}[{i}]", f"unknown drift kind {k!r}")


async def audit_stock(
    session: AsyncSession,
    *,
    size: int = 0,
    token: str = "",
    skus: Sequence[str] = (),
    warehouse_codes: Sequence[str] = (),
    kinds: Sequence[str] = (),
    whole_ledger: bool = False,
    advance_checkpoints: timedelta | None = None,
) -> AuditPage:
    """Drifts of the levels ordered by (sku, warehouse_code), keyset-paginated; a page
    checks at most SCAN_BUDGET levels, so it may come back short with a token.
    `whole_ledger`: the ledger's sums over every level's whole ledger (no checkpoint).
    `advance_checkpoints` (the audit job): move the levels' checkpoints to the sums
    taken, re-summing in full those whose last full re-sum is older than this; the
    caller commits."""
    v = Violations()
    if len(skus) > MAX_AUDIT_SKUS:
        v.add("skus", f"must hold at most {MAX_AUDIT_SKUS} SKUs")
    wanted = sorted({check_sku(v, f"skus[{i}]", s) for i, s in enumerate(skus)})
    for i, wh in enumerate(warehouse_codes):
        check_warehouse_code(v, f"warehouse_codes[{i}]", wh)
    _check_kinds(v, "kinds", kinds)
    v.raise_if_any("the audit request is invalid")
    n = page_size(size)
    whs = sorted(set(warehouse_codes))
    checked_kinds = [k for k in DRIFT_KINDS if not kinds or k in kinds]
    filters = ["audit", wanted, whs, checked_kinds]
    key = decode_token(token, filters)
    after = None if key is None else (str(key[0]), str(key[1]))
    drifts: list[Drift] = []
    checked = 0
    while checked < SCAN_BUDGET:
        # The chunk's drifting levels and its last level (audit_store.figures_page).
        rows = await audit_store.figures_page(
            session,
            skus=wanted,
            warehouse_codes=whs,
            after=after,
            limit=SCAN_CHUNK,
            kinds=checked_kinds,
            whole_ledger=whole_ledger,
            advance=advance_checkpoints,
        )
        start = checked
        for row in rows:
            found = _drifts(row, checked_kinds)
            if drifts and len(drifts) + len(found) > n:
                return AuditPage(drifts, encode_token(list(after or ()), filters), checked)
            drifts += found
            checked = start + int(row.n)
            after = (row.sku, row.warehouse_code)
        if checked - start < SCAN_CHUNK:
            return AuditPage(drifts, "", checked)
    return AuditPage(drifts, encode_token(list(after or ()), filters), checked)


async def audit_all(
    transaction: Callable[[Callable[[AsyncSession], Awaitable[AuditPage]]], Awaitable[AuditPage]],
    *,
    skus: Sequence[str] = (),
    warehouse_codes: Sequence[str] = (),
    kinds: Sequence[str] = (),
    whole_ledger: bool = False,
    advance_checkpoints: timedelta | None = None,
) -> AsyncIterator[AuditPage]:
    """Every page of an audit (audit_stock), each in its own `transaction`
    (Runtime.read; one that commits with `advance_checkpoints`)."""
    token = ""
    while True:
        page = await transaction(
            lambda s, after=token: audit_stock(  # type: ignore[misc]
                s,
                size=500,
                token=after,
                skus=skus,
                warehouse_codes=warehouse_codes,
                kinds=kinds,
                whole_ledger=whole_ledger,
                advance_checkpoints=advance_checkpoints,
            )
        )
        yield page
        token = page.next_token
        if not token:
            return


async def checkpointing_audit(
    sessions: async_sessionmaker[AsyncSession], *, full_after: timedelta, skus: Sequence[str] = ()
) -> AsyncIterator[AuditPage]:
    """The audit job's audit: every page in its own committed transaction, moving the
    levels' checkpoints along and re-summing in full those not re-summed within `full_after`."""

    async def committed(fn: Callable[[AsyncSession], Awaitable[AuditPage]]) -> AuditPage:
        async with UnitOfWork(sessions) as uow:
            page = await fn(uow.session)
            await uow.commit()
        return page

    async for page in audit_all(committed, skus=skus, advance_checkpoints=full_after):
        yield page


async def repair_stock(
    session: AsyncSession,
    *,
    sku: str,
    warehouse_code: str,
    kind: str,
    expected_counter: int,
    expected_derived: int,
    reason: str,
    actor: str = "",
) -> Repair:
    """Fix one drift (see the module docstring for what each kind's repair does)."""
    v = Violations()
    sku = check_sku(v, "sku", sku)
    check_warehouse_code(v, "warehouse_code", warehouse_code)
    if kind not in DRIFT_KINDS:
        v.add("kind", "must be ON_HAND, RESERVED or LOTS")
    if not reason.strip():
        v.add("reason", "is required: it is kept on the audit movement")
    check_text(v, "reason", reason)
    v.raise_if_any("the repair request is invalid")
    row = await audit_store.locked_figures(session, sku, warehouse_code)
    if row is None:
        raise NotFound(
            "STOCK_LEVEL_NOT_FOUND",
            f"there is no stock level of {sku!r} in {warehouse_code!r}",
            metadata={"sku": sku, "warehouse_code": warehouse_code},
        )
    found = _figure(row, kind)
    level = StockLevel(sku, warehouse_code, int(row.on_hand), int(row.reserved), None)
    if not _drifts(row, [kind]):
        return Repair(False, found, None, level)
    if (found.counter, found.derived) != (expected_counter, expected_derived):
        raise FailedPrecondition(
            "STOCK_CHANGED",
            f"the {kind} figures of {sku!r} in {warehouse_code!r} are {found.counter} / {found.derived}, "
            f"not the audited {expected_counter} / {expected_derived}: audit again",
            metadata={
                "sku": sku,
                "warehouse_code": warehouse_code,
                "counter": str(found.counter),
                "derived": str(found.derived),
            },
            precondition_violations=[
                PreconditionViolation(
                    "STOCK_CHANGED",
                    f"{sku}/{warehouse_code}",
                    f"expected {kind} {expected_counter} (derived {expected_derived}), "
                    f"found {found.counter} (derived {found.derived})",
                )
            ],
        )
    on_hand, reserved = int(row.on_hand), int(row.reserved)
    on_hand_before, reserved_before, reserved_after = on_hand, reserved, reserved
    consumed: list[tuple[int, int, int, str]] = []
    cost = None
    if kind == "on_hand":
        on_hand_before = int(row.ledger_on_hand)
    elif kind == "reserved":
        restored = await store.restore_reserved(
            session, sku, warehouse_code, expected=reserved, new=int(row.open_reserved)
        )
        if restored is None:
            raise RuntimeError("stock level changed under its lock")
        reserved_before, reserved_after = int(row.ledger_reserved), int(restored.reserved)
        level = StockLevel(sku, warehouse_code, on_hand, reserved_after, restored.updated_at)
    else:
        cost, consumed = await holds.consume_lots(session, sku, warehouse_code, found.difference)
    facts = await audit_store.threshold_facts(session, sku)
    draft = ledger.Draft(
        sku=sku,
        warehouse_code=warehouse_code,
        type="audit",
        on_hand_before=on_hand_before,
        on_hand_after=on_hand,
        reserved_before=reserved_before,
        reserved_after=reserved_after,
        below_threshold=is_below_threshold(int(facts.total_available), int(facts.threshold)),
        reason=f"{reason} (audit: {kind} {found.counter}, derived {found.derived})",
        source="audit",
        actor=actor,
        reference=f"audit:{kind}",
        cost=cost,
    )
    (movement,) = await ledger.write(session, [draft])
    await holds.record_consumptions(session, [(movement.id, *c) for c in consumed])
    await audit_store.checkpoint_level(
        session,
        sku,
        warehouse_code,
        through_id=movement.id,
        on_hand=int(row.ledger_on_hand) + on_hand - on_hand_before,
        reserved=int(row.ledger_reserved) + reserved_after - reserved_before,
    )
    return Repair(True, found, movement, level)
