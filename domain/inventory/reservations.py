"""Reservations: reserve (one or many requests per transaction), release,
fulfil (FIFO lot costing), extend, read, and the expiry sweeper.

Invariant: per level, `reserved` == sum of open quantities of tracked
reservation lines. Every path changes both in the same transaction, with
guarded UPDATEs whose row counts are checked.

Lock order (no deadlocks): reservation rows first, then stock levels of the
involved SKUs in (sku, warehouse_code) order, then lots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.inventory import ledger
from domain.inventory.allocation import Alloc, Key, Level, Policy, WarehouseInfo, allocate
from domain.inventory.types import (
    RESERVATION_STATES,
    Cost,
    Fulfilment,
    LineQuantity,
    LineRequest,
    Movement,
    Reservation,
    ReservationLine,
    is_below_threshold,
)
from domain.inventory.validation import (
    MAX_MINOR,
    check_quantity,
    check_sku,
    check_text,
    check_warehouse_code,
    filters_or_raise,
)
from domain.platform import idempotency
from domain.platform.idempotency import Answers, Claim
from domain.shared.db import DriverStatement, driver_connection
from domain.shared.errors import (
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PreconditionViolation,
    Violations,
)
from domain.shared.pagination import decode_token, encode_token, page_size

if TYPE_CHECKING:
    import asyncpg  # run-time import would be repeated in Temporal's workflow sandbox (crash)

log = logging.getLogger("entrepot.inventory")

MAX_LINES = 500
MAX_TTL = timedelta(days=30)
_PENDING: Any = object()
SWEEPER_LOCK_KEY = 0x656E_7472_6570_01  # pg advisory lock: one sweeper at a time


@dataclass(frozen=True)
class ReserveRequest:
    """A validated reservation request (build it with `reserve_request`)."""

    lines: tuple[LineRequest, ...]
    reference: str = ""
    ttl: timedelta | None = None
    actor: str = ""
    source: str = "api"


def reserve_request(
    lines: Sequence[LineRequest],
    *,
    reference: str = "",
    ttl: timedelta | None = None,
    actor: str = "",
    source: str = "api",
) -> ReserveRequest:
    """Validate and normalise (NFC SKUs); raises InvalidArgument with every problem."""
    v = Violations()
    if not 1 <= len(lines) <= MAX_LINES:
        v.add("lines", f"must hold 1 to {MAX_LINES} lines")
    norm = []
    for i, line in enumerate(lines):
        sku = check_sku(v, f"lines[{i}].sku", line.sku)
        check_quantity(v, f"lines[{i}].quantity", line.quantity)
        check_warehouse_code(v, f"lines[{i}].warehouse_code", line.warehouse_code, required=False)
        norm.append(LineRequest(sku, line.quantity, line.warehouse_code))
    check_text(v, "reference", reference, 256)
    if ttl is not None and not timedelta(0) < ttl <= MAX_TTL:
        v.add("ttl", "must be positive and at most 30 days")
    v.raise_if_any("the reservation request is invalid")
    return ReserveRequest(tuple(norm), reference, ttl, actor, source)


# ------------------------------------------------------------------ loading

_POLICIES = text(
    """SELECT sku, track_inventory, allow_backorder, max_backorder, low_stock_threshold
       FROM inventory.items WHERE sku = ANY(CAST(:skus AS text[]))"""
)
_WAREHOUSES = text("SELECT code, priority, active FROM inventory.warehouses ORDER BY priority, code")
# Every level of the SKUs, locked in one global order.
_LOCK_LEVELS = text(
    """SELECT sku, warehouse_code, on_hand, reserved FROM inventory.stock_levels
       WHERE sku = ANY(CAST(:skus AS text[])) ORDER BY sku, warehouse_code FOR NO KEY UPDATE"""
)
_ENSURE_LEVELS = DriverStatement(
    """INSERT INTO inventory.stock_levels (sku, warehouse_code)
       SELECT * FROM unnest(CAST(:skus AS text[]), CAST(:whs AS text[])) ON CONFLICT DO NOTHING"""
)
# Guarded counter change for many levels at once. Rows are already locked by
# _LOCK_LEVELS; the guard still refuses anything the plan got wrong.
_APPLY = text(
    """
    UPDATE inventory.stock_levels s
    SET on_hand = s.on_hand + d.dh, reserved = s.reserved + d.dr, updated_at = now()
    FROM unnest(CAST(:skus AS text[]), CAST(:whs AS text[]), CAST(:dh AS bigint[]), CAST(:dr AS bigint[]))
         AS d(sku, wh, dh, dr),
         inventory.items i
    WHERE s.sku = d.sku AND s.warehouse_code = d.wh AND i.sku = d.sku
      AND s.sku = ANY(CAST(:skus AS text[]))
      AND s.on_hand + d.dh >= 0 AND s.reserved + d.dr >= 0
      AND (d.dr <= 0 OR s.on_hand - s.reserved >= d.dr
           OR (i.allow_backorder AND (i.max_backorder = 0 OR s.reserved + d.dr - s.on_hand <= i.max_backorder)))
    RETURNING s.sku, s.warehouse_code, s.on_hand, s.reserved
    """
)


async def _policies(session: AsyncSession, skus: list[str]) -> dict[str, Policy]:
    rows = (await session.execute(_POLICIES, {"skus": skus})).all()
    return {
        r.sku: Policy(r.track_inventory, r.allow_backorder, int(r.max_backorder), int(r.low_stock_threshold))
        for r in rows
    }


async def _warehouses(session: AsyncSession) -> list[WarehouseInfo]:
    rows = (await session.execute(_WAREHOUSES)).all()
    return [WarehouseInfo(r.code, int(r.priority), bool(r.active)) for r in rows]


async def _lock_levels(session: AsyncSession, skus: list[str]) -> dict[Key, Level]:
    rows = (await session.execute(_LOCK_LEVELS, {"skus": sorted(skus)})).all()
    return {(r.sku, r.warehouse_code): Level(int(r.on_hand), int(r.reserved)) for r in rows}


def _totals(levels: dict[Key, Level]) -> dict[str, int]:
    out: dict[str, int] = {}
    for (sku, _), lv in levels.items():
        out[sku] = out.get(sku, 0) + lv.available
    return out


async def _apply(session: AsyncSession, deltas: dict[Key, tuple[int, int]], expect: dict[Key, Level]) -> None:
    """Apply (d_on_hand, d_reserved) per level with the guard; verify the outcome."""
    keys = sorted(k for k, d in deltas.items() if d != (0, 0))
    if not keys:
        return
    rows = (
        await session.execute(
            _APPLY,
            {
                "skus": [k[0] for k in keys],
                "whs": [k[1] for k in keys],
                "dh": [deltas[k][0] for k in keys],
                "dr": [deltas[k][1] for k in keys],
            },
        )
    ).all()
    got = {(r.sku, r.warehouse_code): (int(r.on_hand), int(r.reserved)) for r in rows}
    for k in keys:
        if got.get(k) != (expect[k].on_hand, expect[k].reserved):
            # Cannot happen while the rows are locked; refusing is the safe side.
            raise RuntimeError(f"stock level {k} changed under a lock: got {got.get(k)}, planned {expect[k]}")


# ------------------------------------------------------------------ reserve

# The reserve path's statements run on the session's asyncpg connection
# (DriverStatement): they carry ~40 array parameters, and SQLAlchemy's
# per-statement work costs more than the round trip itself.

# One statement loads everything a plan needs and locks the levels (in one
# global order): levels ('l'), item policies ('i'), warehouses ('w'), and now().
_LOAD = DriverStatement(
    """
    WITH lv AS (
        SELECT sku, warehouse_code, on_hand, reserved FROM inventory.stock_levels
        WHERE sku = ANY(CAST(:skus AS text[])) ORDER BY sku, warehouse_code FOR NO KEY UPDATE
    )
    SELECT 'l' AS kind, sku, warehouse_code AS code, on_hand AS n1, reserved AS n2,
           NULL::boolean AS b1, NULL::boolean AS b2, now() AS ts FROM lv
    UNION ALL
    SELECT 'i', sku, NULL, max_backorder, low_stock_threshold, track_inventory, allow_backorder, now()
    FROM inventory.items WHERE sku = ANY(CAST(:skus AS text[]))
    UNION ALL
    SELECT 'w', NULL, code, priority::bigint, NULL, active, NULL, now() FROM inventory.warehouses
    UNION ALL
    SELECT 'n', NULL, NULL, NULL, NULL, NULL, NULL, now()
    """
)

# The batcher's variant: the same load, preceded by the idempotency claims
# (idempotency.BATCH_CLAIM_CTE, keys sorted) in the same statement, one round
# trip less per batch. The claim branch comes first in the UNION ALL, so it runs
# before the levels are locked, the same order as a separate claim.
_LOAD_CLAIMING = DriverStatement(
    """
    WITH """
    + idempotency.BATCH_CLAIM_CTE
    + """, lv AS (
        SELECT sku, warehouse_code, on_hand, reserved FROM inventory.stock_levels
        WHERE sku = ANY(CAST(:skus AS text[])) ORDER BY sku, warehouse_code FOR NO KEY UPDATE
    )
    SELECT 'c' AS kind, principal AS sku, request_id AS code, NULL::bigint AS n1, NULL::bigint AS n2,
           NULL::boolean AS b1, NULL::boolean AS b2, now() AS ts FROM claimed
    UNION ALL
    SELECT 'l', sku, warehouse_code, on_hand, reserved, NULL, NULL, now() FROM lv
    UNION ALL
    SELECT 'i', sku, NULL, max_backorder, low_stock_threshold, track_inventory, allow_backorder, now()
    FROM inventory.items WHERE sku = ANY(CAST(:skus AS text[]))
    UNION ALL
    SELECT 'w', NULL, code, priority::bigint, NULL, active, NULL, now() FROM inventory.warehouses
    UNION ALL
    SELECT 'n', NULL, NULL, NULL, NULL, NULL, NULL, now()
    """
)

# One statement writes everything a batch granted: guarded counter UPDATE,
# reservations, lines, ledger + outbox, and (batcher) the idempotency answers.
_WRITE = DriverStatement(
    """
    WITH upd AS (
        UPDATE inventory.stock_levels s SET reserved = s.reserved + d.dr, updated_at = now()
        FROM unnest(CAST(:u_sku AS text[]), CAST(:u_wh AS text[]), CAST(:u_dr AS bigint[])) AS d(sku, wh, dr),
             inventory.items i
        WHERE s.sku = d.sku AND s.warehouse_code = d.wh AND i.sku = d.sku
          -- Redundant with the join, but lets the planner use the primary key.
          AND s.sku = ANY(CAST(:u_sku AS text[]))
          AND (s.on_hand - s.reserved >= d.dr
               OR (i.allow_backorder AND (i.max_backorder = 0 OR s.reserved + d.dr - s.on_hand <= i.max_backorder)))
        RETURNING s.sku, s.warehouse_code, s.on_hand, s.reserved
    ), res AS (
        INSERT INTO inventory.reservations (id, reference, state, expires_at, actor, created_at, updated_at)
        SELECT id, ref, 'active', exp, actor, now(), now()
        FROM unnest(CAST(:r_id AS uuid[]), CAST(:r_ref AS text[]), CAST(:r_exp AS timestamptz[]),
                    CAST(:r_actor AS text[])) AS t(id, ref, exp, actor)
        RETURNING id
    ), lin AS (
        INSERT INTO inventory.reservation_lines (reservation_id, line_no, sku, warehouse_code, tracked, quantity,
                                                 backordered)
        SELECT * FROM unnest(CAST(:n_rid AS uuid[]), CAST(:n_no AS int[]), CAST(:n_sku AS text[]),
                             CAST(:n_wh AS text[]), CAST(:n_tracked AS boolean[]), CAST(:n_q AS bigint[]),
                             CAST(:n_bo AS bigint[]))
        RETURNING reservation_id
    ), """
    + ledger.CTES
    + """, st AS ("""
    + idempotency.BATCH_STORE
    + """ RETURNING 1
    )
    SELECT sku, warehouse_code, on_hand, reserved, (SELECT count(*) FROM res) AS n_res,
           (SELECT count(*) FROM lin) AS n_lin, (SELECT count(*) FROM st) AS n_st FROM upd
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, (SELECT count(*) FROM res), (SELECT count(*) FROM lin), (SELECT count(*) FROM st)
    """
)
_STORE_ONLY = DriverStatement(idempotency.BATCH_STORE)


def _ttl_us(ttl: timedelta | None) -> int | None:
    return None if ttl is None else ttl // timedelta(microseconds=1)


async def _load_for_plan(
    conn: asyncpg.Connection[Any], skus: list[str], claims: Sequence[Claim] = ()
) -> tuple[dict[str, Policy], list[WarehouseInfo], dict[Key, Level], datetime, set[tuple[str, str]]]:
    if claims:
        rows = await _LOAD_CLAIMING.fetch(conn, {"skus": skus, **idempotency.batch_claim_params(claims)})
    else:
        rows = await _LOAD.fetch(conn, {"skus": skus})
    policies: dict[str, Policy] = {}
    warehouses: list[WarehouseInfo] = []
    levels: dict[Key, Level] = {}
    claimed: set[tuple[str, str]] = set()
    now: datetime = rows[-1][7]
    for kind, sku, code, n1, n2, b1, b2, _ in rows:
        if kind == "l":
            levels[(sku, code)] = Level(n1, n2)
        elif kind == "i":
            policies[sku] = Policy(b1, b2, n1, n2)
        elif kind == "w":
            warehouses.append(WarehouseInfo(code, n1, b1))
        elif kind == "c":
            claimed.add((sku, code))
    warehouses.sort(key=lambda w: (w.priority, w.code))
    return policies, warehouses, levels, now, claimed


async def reserve_many(
    session: AsyncSession,
    requests: Sequence[ReserveRequest],
) -> list[Reservation | DomainError]:
    """Reserve for several independent requests in the caller's transaction.

    Each request is all or nothing; per request the Reservation or the
    DomainError that refused it (nothing written for it)."""
    results = await reserve_claimed(session, requests, [None] * len(requests))
    return [r for r in results if r is not None]


async def reserve_claimed(
    session: AsyncSession,
    requests: Sequence[ReserveRequest],
    claims: Sequence[Claim | None],
    *,
    store: Callable[[list[Reservation | DomainError | None]], Answers] | None = None,
) -> list[Reservation | DomainError | None]:
    """Reserve for several independent requests in the caller's transaction.

    `claims[i]` (batcher) is request i's idempotency key, claimed in the load
    statement (keys in sorted order); a request whose key was already present
    is not executed and its result is None (the caller replays the stored row).

    Each request is all or nothing; requests are granted in order while stock
    lasts (the group-commit batcher relies on this). Per request the result is
    the Reservation or the DomainError that refused it (nothing written for it).
    Two statements in the common case: load+lock, then write everything.
    `store` (batcher) turns the results into idempotency rows written in the
    same statement.
    """
    return await _reserve_claimed(session, await driver_connection(session), requests, claims, store)


async def _reserve_claimed(
    session: AsyncSession,
    conn: asyncpg.Connection[Any],
    requests: Sequence[ReserveRequest],
    claims: Sequence[Claim | None],
    store: Callable[[list[Reservation | DomainError | None]], Answers] | None,
) -> list[Reservation | DomainError | None]:
    skus = sorted({line.sku for r in requests for line in r.lines})
    to_claim = sorted((c for c in claims if c is not None), key=lambda c: c.key)
    claimed: set[tuple[str, str]] = set()
    for attempt in range(2):
        policies, warehouses, locked, now, got_claims = await _load_for_plan(
            conn, skus, to_claim if attempt == 0 else ()
        )
        if attempt == 0:
            claimed = got_claims
        state = {k: Level(v.on_hand, v.reserved) for k, v in locked.items()}
        plans: list[list[Alloc] | DomainError | None] = []
        for req, claim in zip(requests, claims, strict=True):
            if claim is not None and claim.key not in claimed:
                plans.append(None)  # key already present: not executed, replayed by the caller
                continue
            try:
                plans.append(allocate(req.lines, policies, warehouses, state))
            except DomainError as err:  # this request is refused; the others go on
                plans.append(err)
        missing = sorted(
            {
                (a.sku, a.warehouse_code)
                for p in plans
                if p is not None and not isinstance(p, DomainError)
                for a in p
                if a.tracked and (a.sku, a.warehouse_code) not in locked
            }
        )
        if not missing:
            break
        # A backorder into a level that never had stock: create it, then re-plan
        # under the lock (the new row was not locked when we planned).
        await _ENSURE_LEVELS.execute(conn, {"skus": [m[0] for m in missing], "whs": [m[1] for m in missing]})
    else:
        raise RuntimeError("stock levels kept appearing while reserving")

    # Movements in grant order, with exact before/after per level.
    running = {k: Level(v.on_hand, v.reserved) for k, v in locked.items()}
    totals = _totals(running)
    drafts: list[ledger.Draft] = []
    deltas: dict[Key, int] = {}
    results: list[Reservation | DomainError | None] = []
    granted: list[Reservation] = []
    for req, plan in zip(requests, plans, strict=True):
        if plan is None or isinstance(plan, DomainError):
            results.append(plan)
            continue
        rid = uuid.uuid4()
        for a in plan:
            if not a.tracked:
                continue
            key = (a.sku, a.warehouse_code)
            lv = running[key]
            before = lv.reserved
            lv.reserved += a.quantity
            totals[a.sku] -= a.quantity
            deltas[key] = deltas.get(key, 0) + a.quantity
            drafts.append(
                ledger.Draft(
                    sku=a.sku,
                    warehouse_code=a.warehouse_code,
                    type="reserve",
                    on_hand_before=lv.on_hand,
                    on_hand_after=lv.on_hand,
                    reserved_before=before,
                    reserved_after=lv.reserved,
                    below_threshold=is_below_threshold(totals[a.sku], policies[a.sku].low_stock_threshold),
                    reason="reserved",
                    source=req.source,
                    actor=req.actor,
                    reference=req.reference,
                    reservation_id=rid,
                )
            )
        res = Reservation(
            id=rid,
            reference=req.reference,
            state="active",
            lines=[
                ReservationLine(n, a.sku, a.warehouse_code, a.tracked, a.quantity, a.backordered, 0, 0)
                for n, a in enumerate(plan, start=1)
            ],
            expires_at=None if req.ttl is None else now + req.ttl,
            created_at=now,
            updated_at=now,
            actor=req.actor,
        )
        results.append(res)
        granted.append(res)
    stored = store(results) if store is not None else Answers()
    if not granted:
        if stored.claims:
            await _STORE_ONLY.execute(conn, stored.params())
        return results
    keys = sorted(deltas)
    lines = [(r, line) for r in granted for line in r.lines]
    params: dict[str, object] = {
        "u_sku": [k[0] for k in keys],
        "u_wh": [k[1] for k in keys],
        "u_dr": [deltas[k] for k in keys],
        "r_id": [r.id for r in granted],
        "r_ref": [r.reference for r in granted],
        "r_exp": [r.expires_at for r in granted],
        "r_actor": [r.actor for r in granted],
        "n_rid": [r.id for r, _ in lines],
        "n_no": [x.line_no for _, x in lines],
        "n_sku": [x.sku for _, x in lines],
        "n_wh": [x.warehouse_code for _, x in lines],
        "n_tracked": [x.tracked for _, x in lines],
        "n_q": [x.quantity for _, x in lines],
        "n_bo": [x.backordered for _, x in lines],
        **ledger.params(session, drafts),
        **stored.params(),
    }
    rows = await _WRITE.fetch(conn, params)
    got = {(r[0], r[1]): (r[2], r[3]) for r in rows if r[0] is not None}
    counts = (rows[-1][4], rows[-1][5], rows[-1][6])
    for k in keys:
        if got.get(k) != (running[k].on_hand, running[k].reserved):
            # Cannot happen while the rows are locked; refusing (rolling back) is the safe side.
            raise RuntimeError(
                f"stock level {k} changed under a lock: got {got.get(k)}, planned {running[k]}"
            )
    if counts != (len(granted), len(lines), len(stored.claims)):
        raise RuntimeError(f"reservation write incomplete: {counts}")
    return results


async def reserve(
    session: AsyncSession,
    lines: Sequence[LineRequest],
    *,
    reference: str = "",
    ttl: timedelta | None = None,
    actor: str = "",
    warehouse_code: str = "",
    source: str = "api",
) -> Reservation:
    """Reserve in the caller's transaction (all or nothing). `warehouse_code`
    pins every line without its own warehouse to that warehouse."""
    if warehouse_code:
        lines = [LineRequest(x.sku, x.quantity, x.warehouse_code or warehouse_code) for x in lines]
    req = reserve_request(lines, reference=reference, ttl=ttl, actor=actor, source=source)
    (result,) = await reserve_many(session, [req])
    if isinstance(result, DomainError):
        raise result
    return result


# ------------------------------------------------------------------ reading

_COLUMNS = "id, reference, state, expires_at, actor, created_at, updated_at"
_LINES = text(
    """SELECT reservation_id, line_no, sku, warehouse_code, tracked, quantity, backordered, fulfilled, released
       FROM inventory.reservation_lines WHERE reservation_id = ANY(CAST(:ids AS uuid[]))
       ORDER BY reservation_id, line_no"""
)


def _parse_id(raw: str | uuid.UUID) -> uuid.UUID:
    if isinstance(raw, uuid.UUID):
        return raw
    try:
        return uuid.UUID(raw)
    except ValueError as exc:
        raise InvalidArgument(
            "INVALID_ARGUMENT",
            "reservation id is not a UUID",
            field_violations=[FieldViolation("id", "must be a reservation id (UUID)")],
        ) from exc


async def _reservations(session: AsyncSession, rows: Sequence[Any]) -> list[Reservation]:
    if not rows:
        return []
    line_rows = (await session.execute(_LINES, {"ids": [r.id for r in rows]})).all()
    lines: dict[uuid.UUID, list[ReservationLine]] = {}
    for x in line_rows:
        lines.setdefault(x.reservation_id, []).append(
            ReservationLine(
                x.line_no,
                x.sku,
                x.warehouse_code,
                x.tracked,
                int(x.quantity),
                int(x.backordered),
                int(x.fulfilled),
                int(x.released),
            )
        )
    return [
        Reservation(
            id=r.id,
            reference=r.reference,
            state=r.state,
            lines=lines.get(r.id, []),
            expires_at=r.expires_at,
            created_at=r.created_at,
            updated_at=r.updated_at,
            actor=r.actor,
        )
        for r in rows
    ]


async def _load(session: AsyncSession, rid: uuid.UUID, *, lock: bool) -> Reservation:
    sql = f"SELECT {_COLUMNS} FROM inventory.reservations WHERE id = :id" + (" FOR UPDATE" if lock else "")
    row = (await session.execute(text(sql), {"id": rid})).one_or_none()
    if row is None:
        raise NotFound(
            "RESERVATION_NOT_FOUND", f"reservation {rid} does not exist", metadata={"id": str(rid)}
        )
    (res,) = await _reservations(session, [row])
    return res


async def get_reservation(session: AsyncSession, reservation_id: str | uuid.UUID) -> Reservation:
    return await _load(session, _parse_id(reservation_id), lock=False)


async def list_reservations(
    session: AsyncSession, *, reference: str = "", state: str = "", size: int = 0, token: str = ""
) -> tuple[list[Reservation], str]:
    """By reference (exact) and/or state, oldest first, keyset-paginated."""
    filters_or_raise(reference=reference)
    if state and state not in RESERVATION_STATES:
        raise InvalidArgument("INVALID_ARGUMENT", f"unknown state {state!r}", field_violations=[])
    n = page_size(size)
    filters = ["reservations", reference, state]
    after = decode_token(token, filters)
    where = ["true"]
    params: dict[str, Any] = {"n": n + 1}
    if reference:
        where.append("reference = :ref")
        params["ref"] = reference
    if state:
        where.append("state = :state")
        params["state"] = state
    if after is not None:
        where.append("(created_at, id) > (CAST(:after_t AS timestamptz), CAST(:after_id AS uuid))")
        params["after_t"] = datetime.fromisoformat(str(after[0]))
        params["after_id"] = uuid.UUID(str(after[1]))
    sql = f"SELECT {_COLUMNS} FROM inventory.reservations WHERE {' AND '.join(where)} ORDER BY created_at, id LIMIT :n"
    rows = (await session.execute(text(sql), params)).all()
    more = len(rows) > n
    rows = rows[:n]
    out = await _reservations(session, rows)
    nxt = encode_token([rows[-1].created_at.isoformat(), str(rows[-1].id)], filters) if more else ""
    return out, nxt


# ------------------------------------------------------------------ release / fulfil


@dataclass
class _Take:
    reservation: Reservation
    line: ReservationLine
    quantity: int


@dataclass
class _Outcome:
    movements: list[Movement] = field(default_factory=list)


def _pick(res: Reservation, wanted: Sequence[LineQuantity] | None, *, reverse: bool) -> list[_Take]:
    """Which lines give the requested quantities (None = everything open)."""
    if wanted is None:
        return [_Take(res, line, line.open_quantity) for line in res.lines if line.open_quantity > 0]
    v = Violations()
    short: list[PreconditionViolation] = []
    taken: dict[int, int] = {}
    out: list[_Take] = []
    order = sorted(res.lines, key=lambda x: x.line_no, reverse=reverse)
    for i, w in enumerate(wanted):
        sku = check_sku(v, f"lines[{i}].sku", w.sku)
        check_quantity(v, f"lines[{i}].quantity", w.quantity)
        check_warehouse_code(v, f"lines[{i}].warehouse_code", w.warehouse_code, required=False)
        remaining = w.quantity
        for line in order:
            if line.sku != sku or (w.warehouse_code and line.warehouse_code != w.warehouse_code):
                continue
            free = line.open_quantity - taken.get(line.line_no, 0)
            q = min(free, remaining)
            if q > 0:
                taken[line.line_no] = taken.get(line.line_no, 0) + q
                out.append(_Take(res, line, q))
                remaining -= q
        if remaining > 0 and w.quantity > 0:
            held = sum(
                x.open_quantity
                for x in res.lines
                if x.sku == sku and (not w.warehouse_code or x.warehouse_code == w.warehouse_code)
            )
            short.append(
                PreconditionViolation("QUANTITY_NOT_HELD", sku, f"requested {w.quantity}, held {held}")
            )
    v.raise_if_any("the lines are invalid")
    if short:
        raise FailedPrecondition(
            "QUANTITY_NOT_HELD",
            "the reservation does not hold the requested quantities",
            precondition_violations=short,
        )
    return out


_CLOSE_LINES = text(
    """
    UPDATE inventory.reservation_lines l
    SET fulfilled = l.fulfilled + d.f, released = l.released + d.r
    FROM unnest(CAST(:rids AS uuid[]), CAST(:nos AS int[]), CAST(:fs AS bigint[]), CAST(:rs AS bigint[]))
         AS d(rid, no, f, r)
    WHERE l.reservation_id = d.rid AND l.line_no = d.no AND l.quantity - l.fulfilled - l.released >= d.f + d.r
    RETURNING l.reservation_id
    """
)
_SET_STATE = text(
    """UPDATE inventory.reservations r SET state = d.state, updated_at = now()
       FROM unnest(CAST(:ids AS uuid[]), CAST(:states AS text[])) AS d(id, state) WHERE r.id = d.id"""
)
_LOTS = text(
    """SELECT id, remaining_quantity, unit_cost_minor, currency FROM inventory.lots
       WHERE sku = :sku AND warehouse_code = :wh AND remaining_quantity > 0
       ORDER BY id LIMIT :q FOR UPDATE"""
)
_CONSUME_LOTS = text(
    """UPDATE inventory.lots l SET remaining_quantity = l.remaining_quantity - d.q
       FROM unnest(CAST(:ids AS bigint[]), CAST(:qs AS bigint[])) AS d(id, q)
       WHERE l.id = d.id AND l.remaining_quantity >= d.q"""
)
_CONSUMPTIONS = text(
    """INSERT INTO inventory.lot_consumptions (ledger_id, lot_id, quantity, unit_cost_minor, currency)
       SELECT * FROM unnest(CAST(:lids AS bigint[]), CAST(:lots AS bigint[]), CAST(:qs AS bigint[]),
                            CAST(:costs AS bigint[]), CAST(:curs AS text[]))"""
)


async def _consume_lots(
    session: AsyncSession, sku: str, wh: str, quantity: int
) -> tuple[Cost | None, list[tuple[int, int, int, str]]]:
    """FIFO: the oldest lots first. Units received without a lot carry no cost."""
    rows = (await session.execute(_LOTS, {"sku": sku, "wh": wh, "q": quantity})).all()
    used: list[tuple[int, int, int, str]] = []
    remaining = quantity
    for r in rows:
        if not remaining:
            break
        q = min(remaining, int(r.remaining_quantity))
        used.append((int(r.id), q, int(r.unit_cost_minor), r.currency))
        remaining -= q
    if not used:
        return None, []
    res = await session.execute(_CONSUME_LOTS, {"ids": [u[0] for u in used], "qs": [u[1] for u in used]})
    if res.rowcount != len(used):  # type: ignore[attr-defined]
        raise RuntimeError("lot changed under a lock")
    currencies = {u[3] for u in used}
    # One cost per movement; lots of mixed currencies keep their costs in lot_consumptions only.
    total = sum(u[1] * u[2] for u in used)
    cost = Cost(total, used[0][3]) if len(currencies) == 1 and total <= MAX_MINOR else None
    return cost, used


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
    locked = await _lock_levels(session, skus) if skus else {}
    policies = await _policies(session, skus) if skus else {}
    running = {k: Level(v.on_hand, v.reserved) for k, v in locked.items()}
    totals = _totals(running)
    deltas: dict[Key, tuple[int, int]] = {}
    drafts: list[ledger.Draft] = []
    lot_use: list[list[tuple[int, int, int, str]]] = []
    short: list[PreconditionViolation] = []
    for t in tracked:
        key = (t.line.sku, t.line.warehouse_code)
        lv = running.get(key)
        if lv is None:
            raise RuntimeError(f"reservation line without a stock level: {key}")
        dh = -t.quantity if mode == "fulfil" else 0
        if mode == "fulfil" and lv.on_hand < t.quantity:
            short.append(
                PreconditionViolation(
                    "INSUFFICIENT_STOCK",
                    t.line.sku,
                    f"fulfil {t.quantity} in {t.line.warehouse_code}, on hand {lv.on_hand} (backordered)",
                )
            )
            continue
        before = Level(lv.on_hand, lv.reserved)
        lv.on_hand += dh
        lv.reserved -= t.quantity
        totals[t.line.sku] += t.quantity + dh
        d = deltas.get(key, (0, 0))
        deltas[key] = (d[0] + dh, d[1] - t.quantity)
        cost = None
        used: list[tuple[int, int, int, str]] = []
        if mode == "fulfil":
            cost, used = await _consume_lots(session, t.line.sku, t.line.warehouse_code, t.quantity)
        lot_use.append(used)
        drafts.append(
            ledger.Draft(
                sku=t.line.sku,
                warehouse_code=t.line.warehouse_code,
                type=mode,
                on_hand_before=before.on_hand,
                on_hand_after=lv.on_hand,
                reserved_before=before.reserved,
                reserved_after=lv.reserved,
                below_threshold=is_below_threshold(
                    totals[t.line.sku], policies[t.line.sku].low_stock_threshold
                ),
                reason=reason,
                source=source,
                actor=actor,
                reference=reference or t.reservation.reference,
                reservation_id=t.reservation.id,
                cost=cost,
            )
        )
    if short:
        raise FailedPrecondition(
            "INSUFFICIENT_STOCK",
            "backordered units cannot be fulfilled before stock arrives; nothing was fulfilled",
            precondition_violations=short,
        )
    await _apply(session, deltas, running)
    if takes:
        res = await session.execute(
            _CLOSE_LINES,
            {
                "rids": [t.reservation.id for t in takes],
                "nos": [t.line.line_no for t in takes],
                "fs": [t.quantity if mode == "fulfil" else 0 for t in takes],
                "rs": [t.quantity if mode == "release" else 0 for t in takes],
            },
        )
        if len(res.all()) != len({(t.reservation.id, t.line.line_no) for t in takes}):
            raise RuntimeError("reservation line changed under a lock")
    movements = await ledger.write(session, drafts)
    rows = [
        (m.id, lot, q, c, cur) for m, used in zip(movements, lot_use, strict=True) for lot, q, c, cur in used
    ]
    if rows:
        await session.execute(
            _CONSUMPTIONS,
            {
                "lids": [r[0] for r in rows],
                "lots": [r[1] for r in rows],
                "qs": [r[2] for r in rows],
                "costs": [r[3] for r in rows],
                "curs": [r[4] for r in rows],
            },
        )
    return movements


async def _finish_states(session: AsyncSession, ids: Sequence[uuid.UUID], *, expired: bool) -> None:
    """Closed reservations: fulfilled when every unit shipped, else released/expired."""
    rows = (
        await session.execute(
            text(
                """SELECT reservation_id, sum(quantity - fulfilled - released) AS open, sum(released) AS rel
                   FROM inventory.reservation_lines WHERE reservation_id = ANY(CAST(:ids AS uuid[]))
                   GROUP BY reservation_id"""
            ),
            {"ids": list(ids)},
        )
    ).all()
    states = {
        r.reservation_id: (
            "active" if r.open > 0 else ("expired" if expired else "released") if r.rel > 0 else "fulfilled"
        )
        for r in rows
    }
    await session.execute(_SET_STATE, {"ids": list(states), "states": list(states.values())})


def _expired(res: Reservation, now: datetime) -> bool:
    return res.expires_at is not None and res.expires_at <= now


async def _now(session: AsyncSession) -> datetime:
    return (await session.execute(text("SELECT now()"))).scalar_one()  # type: ignore[no-any-return]


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
    rid = _parse_id(reservation_id)
    filters_or_raise(reason=reason)
    res = await _load(session, rid, lock=True)
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
    await _finish_states(session, [rid], expired=False)
    return await _load(session, rid, lock=False)


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
    rid = _parse_id(reservation_id)
    filters_or_raise(reference=reference)
    res = await _load(session, rid, lock=True)
    if res.state != "active":
        raise FailedPrecondition(
            "RESERVATION_NOT_ACTIVE", f"reservation {rid} is {res.state}", metadata={"state": res.state}
        )
    if _expired(res, await _now(session)):
        raise FailedPrecondition(
            "RESERVATION_EXPIRED", f"reservation {rid} has expired", metadata={"id": str(rid)}
        )
    takes = _pick(res, lines, reverse=False)
    if not takes:
        raise FailedPrecondition("NOTHING_TO_FULFIL", f"reservation {rid} holds nothing")
    movements = await _close(
        session, takes, mode="fulfil", reason="fulfilled", reference=reference, actor=actor, source=source
    )
    await _finish_states(session, [rid], expired=False)
    return Fulfilment(await _load(session, rid, lock=False), movements)


async def extend(
    session: AsyncSession, reservation_id: str | uuid.UUID, ttl: timedelta, *, actor: str = ""
) -> Reservation:
    """A new hold time from now, for an active reservation that has not expired."""
    rid = _parse_id(reservation_id)
    if not timedelta(0) < ttl <= MAX_TTL:
        raise InvalidArgument(
            "INVALID_ARGUMENT", "ttl must be positive and at most 30 days", field_violations=[]
        )
    res = await _load(session, rid, lock=True)
    if res.state != "active":
        raise FailedPrecondition(
            "RESERVATION_NOT_ACTIVE", f"reservation {rid} is {res.state}", metadata={"state": res.state}
        )
    if _expired(res, await _now(session)):
        raise FailedPrecondition(
            "RESERVATION_EXPIRED", f"reservation {rid} has expired", metadata={"id": str(rid)}
        )
    await session.execute(
        text(
            """UPDATE inventory.reservations SET expires_at = now() + :us * interval '1 microsecond',
               updated_at = now() WHERE id = :id"""
        ),
        {"us": _ttl_us(ttl), "id": rid},
    )
    return await _load(session, rid, lock=False)


async def retarget(
    session: AsyncSession,
    reservation_id: str | uuid.UUID,
    *,
    reference: str,
    ttl: timedelta | None = None,
    actor: str = "",
) -> Reservation:
    """Hand an active hold to a new owner (checkout: the cart's hold becomes the
    order's reservation): new reference, new TTL from now (None = no expiry).
    The held quantities do not change, so no counter moves."""
    rid = _parse_id(reservation_id)
    v = Violations()
    check_text(v, "reference", reference, 256)
    if ttl is not None and not timedelta(0) < ttl <= MAX_TTL:
        v.add("ttl", "must be positive and at most 30 days")
    v.raise_if_any("the request is invalid")
    # Checkout runs this while it holds locks: one statement on the driver
    # connection in the common case, the locking read below otherwise.
    conn = await driver_connection(session)
    done = await conn.fetchrow(_RETARGET, rid, reference, actor, _ttl_us(ttl))
    if done is not None:
        return Reservation(
            id=done["id"],
            reference=done["reference"],
            state=done["state"],
            lines=[_line(r) for r in done["lines"]],
            expires_at=done["expires_at"],
            created_at=done["created_at"],
            updated_at=done["updated_at"],
            actor=done["actor"],
        )
    # Missing, not active, expired, or changed since the statement's snapshot:
    # lock it, then look (three statements).
    row = (
        await session.execute(
            text(f"SELECT {_COLUMNS}, now() AS now FROM inventory.reservations WHERE id = :id FOR UPDATE"),
            {"id": rid},
        )
    ).one_or_none()
    if row is None:
        raise NotFound(
            "RESERVATION_NOT_FOUND", f"reservation {rid} does not exist", metadata={"id": str(rid)}
        )
    (res,) = await _reservations(session, [row])
    if res.state != "active":
        raise FailedPrecondition(
            "RESERVATION_NOT_ACTIVE", f"reservation {rid} is {res.state}", metadata={"state": res.state}
        )
    if _expired(res, row.now):
        raise FailedPrecondition(
            "RESERVATION_EXPIRED", f"reservation {rid} has expired", metadata={"id": str(rid)}
        )
    updated = (
        await session.execute(
            text(
                f"""UPDATE inventory.reservations SET reference = :ref,
                   actor = CASE WHEN :actor = '' THEN actor ELSE :actor END,
                   expires_at = CASE WHEN CAST(:us AS bigint) IS NULL THEN NULL
                                     ELSE now() + CAST(:us AS bigint) * interval '1 microsecond' END,
                   updated_at = now() WHERE id = :id RETURNING {_COLUMNS}"""
            ),
            {"ref": reference, "actor": actor, "us": _ttl_us(ttl), "id": rid},
        )
    ).one()
    return Reservation(
        id=updated.id,
        reference=updated.reference,
        state=updated.state,
        lines=res.lines,
        expires_at=updated.expires_at,
        created_at=updated.created_at,
        updated_at=updated.updated_at,
        actor=updated.actor,
    )


def _line(r: Any) -> ReservationLine:
    return ReservationLine(int(r[0]), r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6]), int(r[7]))


# retarget in one statement: the UPDATE locks the row and re-checks that it is
# active and unexpired. Its lines are read in the statement's snapshot, which is
# only current if nobody changed the reservation since: every change of lines
# also updates the reservation row (_finish_states) in the same transaction, so
# the row version (xmin) the UPDATE ends up on must be the snapshot's. If the
# UPDATE had to wait for such a change, it matches nothing, nothing is returned
# and retarget takes the locking path.
_RETARGET = f"""
    WITH seen AS (
        SELECT xmin AS v FROM inventory.reservations WHERE id = $1
    ), u AS (
        UPDATE inventory.reservations r SET reference = $2,
            actor = CASE WHEN $3 = '' THEN r.actor ELSE $3 END,
            expires_at = CASE WHEN $4::bigint IS NULL THEN NULL
                              ELSE now() + $4::bigint * interval '1 microsecond' END,
            updated_at = now()
        FROM seen
        WHERE r.id = $1 AND r.xmin = seen.v AND r.state = 'active'
          AND (r.expires_at IS NULL OR r.expires_at > now())
        RETURNING {", ".join("r." + c for c in _COLUMNS.split(", "))}
    )
    SELECT u.*, ARRAY(
        SELECT row(line_no, sku, warehouse_code, tracked, quantity, backordered, fulfilled, released)
        FROM inventory.reservation_lines WHERE reservation_id = $1 ORDER BY line_no) AS lines
    FROM u
"""


# ------------------------------------------------------------------ expiry

_EXPIRED = text(
    f"""SELECT {_COLUMNS} FROM inventory.reservations
        WHERE state = 'active' AND expires_at <= now()
        ORDER BY expires_at LIMIT :limit FOR UPDATE SKIP LOCKED"""
)


async def sweep_expired(session: AsyncSession, limit: int = 200) -> int:
    """Release up to `limit` expired holds in the caller's transaction (ledger +
    outbox rows, state expired). SKIP LOCKED: holds being worked on elsewhere
    are left for the next sweep. Returns how many reservations expired."""
    rows = (await session.execute(_EXPIRED, {"limit": limit})).all()
    if not rows:
        return 0
    reservations = await _reservations(session, rows)
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
    await _finish_states(session, [r.id for r in reservations], expired=True)
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
            async with sessions() as session, session.begin():
                got = (
                    await session.execute(
                        text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": SWEEPER_LOCK_KEY}
                    )
                ).scalar_one()
                if got:
                    swept = await sweep_expired(session, limit)
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
