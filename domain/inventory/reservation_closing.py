"""Closing reservations: release, fulfil (FIFO lot costing, each kit line's
cost) and the expiry sweeper. Every path closes line quantities (`_close`),
then sets the reservations' states and tells their owners (`_finish`,
`observe_reservations`). The statements live in reservation_store.py.

The invariant and the lock order of reservations.py hold here: reservation
rows first, then stock levels in (sku, warehouse_code) order, then lots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.inventory import ledger
from domain.inventory import reservation_store as store
from domain.inventory.allocation import Key
from domain.inventory.reservations import available_by_sku, load_holding, parse_reservation_id
from domain.inventory.stock_rules import Level
from domain.inventory.types import (
    Cost,
    Fulfilment,
    KitCost,
    LineQuantity,
    Movement,
    Reservation,
    ReservationChange,
    ReservationLine,
    is_below_threshold,
)
from domain.inventory.validation import (
    MAX_MINOR,
    check_quantity,
    check_sku,
    check_warehouse_code,
    filters_or_raise,
)
from domain.shared.errors import FailedPrecondition, PreconditionViolation, Violations
from domain.shared.uow import UnitOfWork

log = logging.getLogger("entrepot.inventory")


# ------------------------------------------------------------------ release / fulfil


@dataclass
class _Take:
    reservation: Reservation
    line: ReservationLine
    quantity: int


def _pick(res: Reservation, wanted: Sequence[LineQuantity] | None, *, reverse: bool) -> list[_Take]:
    """Which lines give the requested quantities (None = everything open).

    A requested SKU that is a kit line of the reservation takes quantity x the
    units per kit it was reserved with from each of that kit's component lines
    (all or nothing); any other SKU takes from the plain lines of that SKU only
    (units held for a kit move with their kit)."""
    if wanted is None:
        return [_Take(res, line, line.open_quantity) for line in res.lines if line.open_quantity > 0]
    v = Violations()
    short: list[PreconditionViolation] = []
    taken: dict[int, int] = {}
    out: list[_Take] = []
    order = sorted(res.lines, key=lambda x: x.line_no, reverse=reverse)
    kit_parts: dict[str, dict[str, int]] = {}
    for x in res.lines:
        if x.kit_sku:
            kit_parts.setdefault(x.kit_sku, {})[x.sku] = x.quantity_per_kit

    def held(sku: str, kit_sku: str, warehouse_code: str, *, before_this_call: bool = False) -> int:
        return sum(
            x.open_quantity - (0 if before_this_call else taken.get(x.line_no, 0))
            for x in res.lines
            if x.sku == sku
            and x.kit_sku == kit_sku
            and (not warehouse_code or x.warehouse_code == warehouse_code)
        )

    def take(sku: str, kit_sku: str, quantity: int, warehouse_code: str) -> None:
        remaining = quantity
        for line in order:
            if line.sku != sku or line.kit_sku != kit_sku:
                continue
            if warehouse_code and line.warehouse_code != warehouse_code:
                continue
            q = min(line.open_quantity - taken.get(line.line_no, 0), remaining)
            if q > 0:
                taken[line.line_no] = taken.get(line.line_no, 0) + q
                out.append(_Take(res, line, q))
                remaining -= q

    for i, w in enumerate(wanted):
        sku = check_sku(v, f"lines[{i}].sku", w.sku)
        check_quantity(v, f"lines[{i}].quantity", w.quantity)
        check_warehouse_code(v, f"lines[{i}].warehouse_code", w.warehouse_code, required=False)
        if w.quantity <= 0:
            continue
        parts = kit_parts.get(sku)
        if parts is not None:
            kits_held = min(held(c, sku, w.warehouse_code) // per for c, per in parts.items())
            if kits_held < w.quantity:
                short.append(
                    PreconditionViolation(
                        "QUANTITY_NOT_HELD", sku, f"requested {w.quantity} kits, held {kits_held}"
                    )
                )
                continue
            for c, per in sorted(parts.items()):
                take(c, sku, w.quantity * per, w.warehouse_code)
            continue
        have = held(sku, "", w.warehouse_code)
        if have < w.quantity:
            short.append(
                PreconditionViolation(
                    "QUANTITY_NOT_HELD",
                    sku,
                    f"requested {w.quantity}, held {held(sku, '', w.warehouse_code, before_this_call=True)}",
                )
            )
            continue
        take(sku, "", w.quantity, w.warehouse_code)
    v.raise_if_any("the lines are invalid")
    if short:
        raise FailedPrecondition(
            "QUANTITY_NOT_HELD",
            "the reservation does not hold the requested quantities",
            precondition_violations=short,
        )
    return out


@dataclass
class _Step:
    """One take's movement: the level's counters before and after, and the SKU's
    availability after (the below-threshold flag)."""

    take: _Take
    before: Level
    after: Level
    sku_available: int


async def _close(
    session: AsyncSession,
    takes: list[_Take],
    *,
    mode: str,
    reason: str,
    reference: str,
    actor: str,
    source: str,
) -> list[Movement]:
    """Release or fulfil the given line quantities; ledger + outbox per line."""
    tracked = [t for t in takes if t.line.tracked]
    skus = sorted({t.line.sku for t in tracked})
    levels = await store.lock_levels(session, skus) if skus else {}
    policies = await store.policies(session, skus) if skus else {}
    steps, deltas, final = _closing_steps(tracked, levels, fulfil=mode == "fulfil")
    drafts: list[ledger.Draft] = []
    lot_use: list[list[tuple[int, int, int, str]]] = []
    for step in steps:
        t = step.take
        cost: Cost | None = None
        used: list[tuple[int, int, int, str]] = []
        if mode == "fulfil":
            cost, used = await store.consume_lots(session, t.line.sku, t.line.warehouse_code, t.quantity)
        lot_use.append(used)
        drafts.append(
            ledger.Draft(
                sku=t.line.sku,
                warehouse_code=t.line.warehouse_code,
                type=mode,
                on_hand_before=step.before.on_hand,
                on_hand_after=step.after.on_hand,
                reserved_before=step.before.reserved,
                reserved_after=step.after.reserved,
                below_threshold=is_below_threshold(
                    step.sku_available, policies[t.line.sku].low_stock_threshold
                ),
                reason=reason,
                source=source,
                actor=actor,
                reference=reference or t.reservation.reference,
                reservation_id=t.reservation.id,
                cost=cost,
                kit_sku=t.line.kit_sku,
            )
        )
    await store.apply_deltas(session, deltas, final)
    if takes:
        fulfilled = mode == "fulfil"
        await store.close_lines(
            session,
            [
                (
                    t.reservation.id,
                    t.line.line_no,
                    t.quantity if fulfilled else 0,
                    0 if fulfilled else t.quantity,
                )
                for t in takes
            ],
        )
    movements = await ledger.write(session, drafts)
    await store.record_consumptions(
        session,
        [
            (m.id, lot, q, c, cur)
            for m, used in zip(movements, lot_use, strict=True)
            for lot, q, c, cur in used
        ],
    )
    return movements


def _closing_steps(
    tracked: Sequence[_Take], levels: dict[Key, Level], *, fulfil: bool
) -> tuple[list[_Step], dict[Key, tuple[int, int]], dict[Key, Level]]:
    """Each take's movement in order, the (on_hand, reserved) delta per level, and
    the levels' final counters. Fulfilling takes on_hand too: units that are
    backordered (not on hand) refuse the whole call."""
    running = {k: Level(v.on_hand, v.reserved) for k, v in levels.items()}
    totals = available_by_sku(running)
    steps: list[_Step] = []
    deltas: dict[Key, tuple[int, int]] = {}
    short: list[PreconditionViolation] = []
    for t in tracked:
        key = (t.line.sku, t.line.warehouse_code)
        lv = running.get(key)
        if lv is None:
            raise RuntimeError(f"reservation line without a stock level: {key}")
        if fulfil and lv.on_hand < t.quantity:
            short.append(
                PreconditionViolation(
                    "INSUFFICIENT_STOCK",
                    t.line.sku,
                    f"fulfil {t.quantity} in {t.line.warehouse_code}, on hand {lv.on_hand} (backordered)",
                )
            )
            continue
        before = Level(lv.on_hand, lv.reserved)
        dh = -t.quantity if fulfil else 0
        lv.on_hand += dh
        lv.reserved -= t.quantity
        totals[t.line.sku] += t.quantity + dh
        d = deltas.get(key, (0, 0))
        deltas[key] = (d[0] + dh, d[1] - t.quantity)
        steps.append(_Step(t, before, Level(lv.on_hand, lv.reserved), totals[t.line.sku]))
    if short:
        raise FailedPrecondition(
            "INSUFFICIENT_STOCK",
            "backordered units cannot be fulfilled before stock arrives; nothing was fulfilled",
            precondition_violations=short,
        )
    return steps, deltas, running


# Owners of reservations (by reference prefix, e.g. "order:") that keep their
# own state true to what a reservation still holds: called in the transaction
# that released, fulfilled or expired it.
ReservationObserver = Callable[[AsyncSession, Sequence[ReservationChange]], Awaitable[None]]
_observers: dict[str, ReservationObserver] = {}


def observe_reservations(reference_prefix: str, observer: ReservationObserver) -> None:
    """Registers (or replaces) the observer of the reservations whose reference starts with the prefix."""
    _observers[reference_prefix] = observer


async def _finish(session: AsyncSession, ids: Sequence[uuid.UUID], *, expired: bool) -> None:
    """Sets the reservations' states, then tells their owners what they hold now."""
    changes = await store.finish_states(session, ids, expired=expired)
    for prefix, observer in _observers.items():
        mine = [c for c in changes if c.reference.startswith(prefix)]
        if mine:
            await observer(session, mine)


async def release(
    session: AsyncSession,
    reservation_id: str | uuid.UUID,
    lines: Sequence[LineQuantity] | None = None,
    *,
    reason: str = "",
    actor: str = "",
    source: str = "api",
) -> Reservation:
    """Release everything still held (lines=None) or some quantities.

    Releasing a reservation that no longer holds anything with lines=None is a
    no-op that returns it (cancel after expiry must not fail)."""
    rid = parse_reservation_id(reservation_id)
    filters_or_raise(reason=reason)
    res = await store.load(session, rid, lock=True)
    if res.state != "active":
        if lines is None:
            return res
        raise FailedPrecondition(
            "RESERVATION_NOT_ACTIVE", f"reservation {rid} is {res.state}", metadata={"state": res.state}
        )
    takes = _pick(res, lines, reverse=True)
    await _close(
        session, takes, mode="release", reason=reason or "released", reference="", actor=actor, source=source
    )
    await _finish(session, [rid], expired=False)
    return await store.load(session, rid, lock=False)


async def fulfil(
    session: AsyncSession,
    reservation_id: str | uuid.UUID,
    lines: Sequence[LineQuantity] | None = None,
    *,
    reference: str = "",
    actor: str = "",
    source: str = "api",
) -> Fulfilment:
    """Ship everything still held (lines=None) or some quantities: on_hand and
    reserved both drop; lots are consumed FIFO and the cost is on the ledger."""
    rid = parse_reservation_id(reservation_id)
    filters_or_raise(reference=reference)
    res = await load_holding(session, rid)
    takes = _pick(res, lines, reverse=False)
    if not takes:
        raise FailedPrecondition("NOTHING_TO_FULFIL", f"reservation {rid} holds nothing")
    movements = await _close(
        session, takes, mode="fulfil", reason="fulfilled", reference=reference, actor=actor, source=source
    )
    await _finish(session, [rid], expired=False)
    return Fulfilment(await store.load(session, rid, lock=False), movements, _kit_costs(takes, movements))


def _kit_costs(takes: Sequence[_Take], movements: Sequence[Movement]) -> list[KitCost]:
    """Per kit line fulfilled: the kits shipped and the sum of its component
    movements' FIFO costs (None when a tracked component's units carried no cost,
    or the costs are in more than one currency)."""
    shipped: dict[str, dict[str, list[int]]] = {}  # kit -> component -> [units, per kit]
    for t in takes:
        if t.line.kit_sku:
            units = shipped.setdefault(t.line.kit_sku, {}).setdefault(
                t.line.sku, [0, t.line.quantity_per_kit]
            )
            units[0] += t.quantity
    out: list[KitCost] = []
    for kit, components in shipped.items():
        mine = [m for m in movements if m.kit_sku == kit]
        currencies = {m.cost.currency for m in mine if m.cost is not None}
        costed = bool(mine) and all(m.cost is not None for m in mine) and len(currencies) == 1
        total = sum(m.cost.amount_minor for m in mine if m.cost is not None)
        out.append(
            KitCost(
                kit,
                min(units // per for units, per in components.values()),
                Cost(total, currencies.pop()) if costed and total <= MAX_MINOR else None,
            )
        )
    return out


# ------------------------------------------------------------------ expiry


async def sweep_expired(session: AsyncSession, limit: int = 200) -> int:
    """Release up to `limit` expired holds in the caller's transaction (ledger +
    outbox rows, state expired). Holds being worked on elsewhere are left for
    the next sweep. Returns how many reservations expired."""
    reservations = await store.lock_expired(session, limit)
    if not reservations:
        return 0
    takes = [t for res in reservations for t in _pick(res, None, reverse=True)]
    await _close(
        session,
        takes,
        mode="release",
        reason="expired",
        reference="",
        actor="system:sweeper",
        source="sweeper",
    )
    await _finish(session, [r.id for r in reservations], expired=True)
    return len(reservations)


async def run_sweeper(
    sessions: async_sessionmaker[AsyncSession],
    stop: asyncio.Event,
    *,
    interval: float = 1.0,
    limit: int = 200,
) -> None:
    """Background loop for the server. Several replicas may run it: a
    transaction-scoped advisory lock lets one sweep at a time."""
    while not stop.is_set():
        swept = 0
        try:
            async with UnitOfWork(sessions) as uow:
                if await store.try_sweeper_lock(uow.session):
                    swept = await sweep_expired(uow.session, limit)
                await uow.commit()
            if swept:
                log.info("expired reservations released", extra={"count": swept})
        except (DBAPIError, OSError) as exc:
            # The database may be restarting; try again on the next tick.
            log.warning("expiry sweep failed: %s", type(exc).__name__)
        except Exception:
            # Anything else is a bug worth a stack trace, but must not stop expiry for good.
            log.exception("expiry sweep failed")
        if swept < limit:
            # Sleep until the next tick, or less if asked to stop.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
