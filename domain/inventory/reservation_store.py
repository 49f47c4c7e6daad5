"""Reservations' statements: everything domain/inventory/reservations.py and
reservation_closing.py read and write, as functions named for what they do.

The reserve path (load_for_plan, ensure_levels, write_granted, store_answers)
runs on the session's asyncpg connection (DriverStatement): its statements
carry ~40 array parameters, and SQLAlchemy's per-statement work costs more
than the round trip itself. Release, fulfil, reads and the sweeper use
SQLAlchemy's text() statements on the session.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from domain.inventory import ledger
from domain.inventory.allocation import Key, WarehouseInfo
from domain.inventory.stock_rules import Level, Policy, may_reserve_sql
from domain.inventory.types import (
    ChannelAllocation,
    Cost,
    GeoPoint,
    KitComponent,
    Reservation,
    ReservationChange,
    ReservationLine,
)
from domain.inventory.validation import MAX_MINOR
from domain.platform import idempotency
from domain.platform.idempotency import Answers, Claim
from domain.shared.db import DriverStatement
from domain.shared.errors import NotFound

if TYPE_CHECKING:
    import asyncpg  # run-time import would be repeated in Temporal's workflow sandbox (crash)


def ttl_us(ttl: timedelta | None) -> int | None:
    return None if ttl is None else ttl // timedelta(microseconds=1)


# ------------------------------------------------------------------ reserve

# Everything a plan needs, in one statement that also locks the levels (in one
# global order). One row per thing, `kind` saying which; the columns a kind
# does not use are NULL, and every row carries the transaction's now().
# 'channel' rows: the allocation settings of the batch's channels (sku = the
# slug, principal = the strategy); a batch without channels reads none.
# 'kit' rows: the definitions of the kits among the SKUs (sku = the kit,
# principal = the component, on_hand = its units per kit); the levels and items
# read are those of the SKUs and of these components (`wanted`), so a kit's
# components are locked in the same statement, in the same global order.
_PLAN_ROWS = """
    SELECT 'level' AS kind, sku, warehouse_code, on_hand, reserved,
           NULL::boolean AS track_inventory, NULL::boolean AS allow_backorder, NULL::bigint AS max_backorder,
           NULL::bigint AS low_stock_threshold, NULL::bigint AS priority, NULL::boolean AS active,
           NULL::text AS principal, NULL::text AS request_id, now() AS now,
           NULL::double precision AS latitude, NULL::double precision AS longitude, NULL::text[] AS codes
    FROM levels
    UNION ALL
    SELECT 'item', sku, NULL, NULL, NULL, track_inventory, allow_backorder, max_backorder, low_stock_threshold,
           NULL, NULL, NULL, NULL, now(), NULL, NULL, NULL
    FROM inventory.items WHERE sku = ANY(CAST((SELECT skus FROM wanted) AS text[]))
    UNION ALL
    SELECT 'kit', kit_sku, NULL, quantity, NULL, NULL, NULL, NULL, NULL, NULL, NULL, component_sku, NULL, now(),
           NULL, NULL, NULL
    FROM inventory.kit_components WHERE kit_sku = ANY(CAST(:skus AS text[]))
    UNION ALL
    SELECT 'warehouse', NULL, code, NULL, NULL, NULL, NULL, NULL, NULL, priority::bigint, active, NULL, NULL, now(),
           latitude, longitude, NULL
    FROM inventory.warehouses
    UNION ALL
    SELECT 'channel', channel_slug, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, strategy, NULL, now(),
           NULL, NULL, warehouse_codes
    FROM inventory.channel_allocations WHERE channel_slug = ANY(CAST(:channels AS text[]))
    UNION ALL
    SELECT 'now', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, now(), NULL, NULL, NULL
"""
_LOCKED_LEVELS = """wanted AS (
        SELECT CAST(:skus AS text[]) || ARRAY(
            SELECT component_sku FROM inventory.kit_components WHERE kit_sku = ANY(CAST(:skus AS text[]))
        ) AS skus
    ), levels AS (
        SELECT sku, warehouse_code, on_hand, reserved FROM inventory.stock_levels
        WHERE sku = ANY(CAST((SELECT skus FROM wanted) AS text[])) ORDER BY sku, warehouse_code FOR NO KEY UPDATE
    )"""
_LOAD_FOR_PLAN = DriverStatement("WITH " + _LOCKED_LEVELS + _PLAN_ROWS)
# The batcher's variant: the idempotency claims (keys sorted) in the same
# statement, one round trip less per batch. The claim branch comes first in the
# UNION ALL, so it runs before the levels are locked, the same order as a
# separate claim.
_CLAIM_AND_LOAD_FOR_PLAN = DriverStatement(
    "WITH "
    + idempotency.BATCH_CLAIM_CTE
    + ", "
    + _LOCKED_LEVELS
    + """
    SELECT 'claimed' AS kind, NULL, NULL, NULL::bigint, NULL::bigint, NULL::boolean, NULL::boolean, NULL::bigint,
           NULL::bigint, NULL::bigint, NULL::boolean, principal, request_id, now(),
           NULL::double precision, NULL::double precision, NULL::text[]
    FROM claimed
    UNION ALL"""
    + _PLAN_ROWS
)
(_KIND, _SKU, _WAREHOUSE, _ON_HAND, _RESERVED, _TRACK, _BACKORDER, _MAX_BACKORDER, _THRESHOLD, _PRIORITY,
 _ACTIVE, _PRINCIPAL, _REQUEST_ID, _NOW, _LATITUDE, _LONGITUDE, _CODES) = range(17)  # fmt: skip


@dataclass
class PlanInputs:
    policies: dict[str, Policy]
    warehouses: list[WarehouseInfo]  # by priority, then code
    levels: dict[Key, Level]  # locked
    now: datetime
    claimed: set[idempotency.Key]  # keys this statement claimed
    channels: dict[str, ChannelAllocation] = field(default_factory=dict)  # channels with a setting
    kits: dict[str, list[KitComponent]] = field(
        default_factory=dict
    )  # definitions of the kits among the SKUs


async def load_for_plan(
    conn: asyncpg.Connection[Any], skus: list[str], claims: Sequence[Claim] = (), channels: Sequence[str] = ()
) -> PlanInputs:
    """Lock the levels of the SKUs and of their kits' components and read what
    allocation needs (with the allocation settings of `channels`); with `claims` (sorted by key), claim those
    idempotency keys first."""
    params: dict[str, object] = {"skus": skus, "channels": list(channels)}
    if claims:
        rows = await _CLAIM_AND_LOAD_FOR_PLAN.fetch(
            conn, {**params, **idempotency.batch_claim_params(claims)}
        )
    else:
        rows = await _LOAD_FOR_PLAN.fetch(conn, params)
    out = PlanInputs({}, [], {}, rows[-1][_NOW], set())
    for r in rows:
        kind = r[_KIND]
        if kind == "level":
            out.levels[(r[_SKU], r[_WAREHOUSE])] = Level(r[_ON_HAND], r[_RESERVED])
        elif kind == "item":
            out.policies[r[_SKU]] = Policy(r[_TRACK], r[_BACKORDER], r[_MAX_BACKORDER], r[_THRESHOLD])
        elif kind == "warehouse":
            lat, lon = r[_LATITUDE], r[_LONGITUDE]
            location = None if lat is None or lon is None else GeoPoint(lat, lon)
            out.warehouses.append(WarehouseInfo(r[_WAREHOUSE], r[_PRIORITY], r[_ACTIVE], location))
        elif kind == "channel":
            out.channels[r[_SKU]] = ChannelAllocation(r[_SKU], tuple(r[_CODES]), r[_PRINCIPAL])
        elif kind == "kit":
            out.kits.setdefault(r[_SKU], []).append(KitComponent(r[_PRINCIPAL], r[_ON_HAND]))
        elif kind == "claimed":
            out.claimed.add((r[_PRINCIPAL], r[_REQUEST_ID]))
    for components in out.kits.values():
        components.sort(key=lambda c: c.sku)
    out.warehouses.sort(key=lambda w: (w.priority, w.code))
    return out


_ENSURE_LEVELS = DriverStatement(
    """INSERT INTO inventory.stock_levels (sku, warehouse_code)
       SELECT * FROM unnest(CAST(:skus AS text[]), CAST(:whs AS text[])) ON CONFLICT DO NOTHING"""
)


async def ensure_levels(conn: asyncpg.Connection[Any], keys: Sequence[Key]) -> None:
    """Create the (sku, warehouse) levels that do not exist yet."""
    await _ENSURE_LEVELS.execute(conn, {"skus": [k[0] for k in keys], "whs": [k[1] for k in keys]})


# Everything a batch granted, in one statement: guarded counter UPDATE,
# reservations, lines, ledger + outbox, and (batcher) the idempotency answers.
_WRITE_GRANTED = DriverStatement(
    """
    WITH counters AS (
        UPDATE inventory.stock_levels s SET reserved = s.reserved + d.quantity, updated_at = now()
        FROM unnest(CAST(:level_skus AS text[]), CAST(:level_warehouses AS text[]),
                    CAST(:level_quantities AS bigint[])) AS d(sku, warehouse_code, quantity),
             inventory.items i
        WHERE s.sku = d.sku AND s.warehouse_code = d.warehouse_code AND i.sku = d.sku
          -- Redundant with the join, but lets the planner use the primary key.
          AND s.sku = ANY(CAST(:level_skus AS text[]))
          AND """
    + may_reserve_sql("d.quantity")
    + """
        RETURNING s.sku, s.warehouse_code, s.on_hand, s.reserved
    ), reservations AS (
        INSERT INTO inventory.reservations (id, reference, state, expires_at, actor, created_at, updated_at)
        SELECT id, reference, 'active', expires_at, actor, now(), now()
        FROM unnest(CAST(:reservation_ids AS uuid[]), CAST(:reservation_references AS text[]),
                    CAST(:reservation_expiries AS timestamptz[]), CAST(:reservation_actors AS text[]))
             AS t(id, reference, expires_at, actor)
        RETURNING id
    ), lines AS (
        INSERT INTO inventory.reservation_lines (reservation_id, line_no, sku, warehouse_code, tracked, quantity,
                                                 backordered, kit_sku, quantity_per_kit)
        SELECT * FROM unnest(CAST(:line_reservation_ids AS uuid[]), CAST(:line_numbers AS int[]),
                             CAST(:line_skus AS text[]), CAST(:line_warehouses AS text[]),
                             CAST(:line_tracked AS boolean[]), CAST(:line_quantities AS bigint[]),
                             CAST(:line_backordered AS bigint[]), CAST(:line_kit_skus AS text[]),
                             CAST(:line_quantities_per_kit AS bigint[]))
        RETURNING reservation_id
    ), """
    + ledger.CTES
    + """, answers AS ("""
    + idempotency.BATCH_STORE
    + """ RETURNING 1
    )
    SELECT sku, warehouse_code, on_hand, reserved, (SELECT count(*) FROM reservations) AS reservations,
           (SELECT count(*) FROM lines) AS lines, (SELECT count(*) FROM answers) AS answers FROM counters
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, (SELECT count(*) FROM reservations), (SELECT count(*) FROM lines),
           (SELECT count(*) FROM answers)
    """
)
_STORE_ANSWERS = DriverStatement(idempotency.BATCH_STORE)


async def write_granted(
    session: AsyncSession,
    conn: asyncpg.Connection[Any],
    granted: Sequence[Reservation],
    reserved: dict[Key, int],
    expected: dict[Key, Level],
    drafts: Sequence[ledger.Draft],
    answers: Answers,
) -> None:
    """Write granted reservations: `reserved` more units per level (the guard
    refuses anything the plan got wrong: the counters must end as `expected`),
    the reservations and their lines, their ledger rows and events, and the answers."""
    keys = sorted(reserved)
    lines = [(r, line) for r in granted for line in r.lines]
    params: dict[str, object] = {
        "level_skus": [k[0] for k in keys],
        "level_warehouses": [k[1] for k in keys],
        "level_quantities": [reserved[k] for k in keys],
        "reservation_ids": [r.id for r in granted],
        "reservation_references": [r.reference for r in granted],
        "reservation_expiries": [r.expires_at for r in granted],
        "reservation_actors": [r.actor for r in granted],
        "line_reservation_ids": [r.id for r, _ in lines],
        "line_numbers": [x.line_no for _, x in lines],
        "line_skus": [x.sku for _, x in lines],
        "line_warehouses": [x.warehouse_code for _, x in lines],
        "line_tracked": [x.tracked for _, x in lines],
        "line_quantities": [x.quantity for _, x in lines],
        "line_backordered": [x.backordered for _, x in lines],
        "line_kit_skus": [x.kit_sku or None for _, x in lines],
        "line_quantities_per_kit": [x.quantity_per_kit or None for _, x in lines],
        **ledger.params(session, drafts),
        **answers.params(),
    }
    rows = await _WRITE_GRANTED.fetch(conn, params)
    got = {(r[0], r[1]): (r[2], r[3]) for r in rows if r[0] is not None}
    for k in keys:
        if got.get(k) != (expected[k].on_hand, expected[k].reserved):
            # Cannot happen while the rows are locked; refusing (rolling back) is the safe side.
            raise RuntimeError(
                f"stock level {k} changed under a lock: got {got.get(k)}, planned {expected[k]}"
            )
    counts = (rows[-1][4], rows[-1][5], rows[-1][6])
    if counts != (len(granted), len(lines), len(answers.claims)):
        raise RuntimeError(f"reservation write incomplete: {counts}")


async def store_answers(conn: asyncpg.Connection[Any], answers: Answers) -> None:
    """The idempotency answers of a batch that granted nothing."""
    await _STORE_ANSWERS.execute(conn, answers.params())


# ------------------------------------------------------------------ levels (release / fulfil)

_POLICIES = text(
    """SELECT sku, track_inventory, allow_backorder, max_backorder, low_stock_threshold
       FROM inventory.items WHERE sku = ANY(CAST(:skus AS text[]))"""
)
# Every level of the SKUs, locked in one global order.
_LOCK_LEVELS = text(
    """SELECT sku, warehouse_code, on_hand, reserved FROM inventory.stock_levels
       WHERE sku = ANY(CAST(:skus AS text[])) ORDER BY sku, warehouse_code FOR NO KEY UPDATE"""
)
# Guarded counter change for many levels at once (rows already locked by
# lock_levels); the guard still refuses anything the plan got wrong.
_APPLY_DELTAS = text(
    """
    UPDATE inventory.stock_levels s
    SET on_hand = s.on_hand + d.on_hand_delta, reserved = s.reserved + d.reserved_delta, updated_at = now()
    FROM unnest(CAST(:skus AS text[]), CAST(:whs AS text[]), CAST(:on_hand_deltas AS bigint[]),
                CAST(:reserved_deltas AS bigint[])) AS d(sku, wh, on_hand_delta, reserved_delta),
         inventory.items i
    WHERE s.sku = d.sku AND s.warehouse_code = d.wh AND i.sku = d.sku
      AND s.sku = ANY(CAST(:skus AS text[]))
      AND s.on_hand + d.on_hand_delta >= 0 AND s.reserved + d.reserved_delta >= 0
      AND (d.reserved_delta <= 0 OR """
    + may_reserve_sql("d.reserved_delta")
    + """)
    RETURNING s.sku, s.warehouse_code, s.on_hand, s.reserved
    """
)


async def policies(session: AsyncSession, skus: list[str]) -> dict[str, Policy]:
    rows = (await session.execute(_POLICIES, {"skus": skus})).all()
    return {
        r.sku: Policy(r.track_inventory, r.allow_backorder, int(r.max_backorder), int(r.low_stock_threshold))
        for r in rows
    }


async def lock_levels(session: AsyncSession, skus: list[str]) -> dict[Key, Level]:
    rows = (await session.execute(_LOCK_LEVELS, {"skus": sorted(skus)})).all()
    return {(r.sku, r.warehouse_code): Level(int(r.on_hand), int(r.reserved)) for r in rows}


async def apply_deltas(
    session: AsyncSession, deltas: dict[Key, tuple[int, int]], expected: dict[Key, Level]
) -> None:
    """Apply (on_hand delta, reserved delta) per level with the guard; the counters must end as `expected`."""
    keys = sorted(k for k, d in deltas.items() if d != (0, 0))
    if not keys:
        return
    rows = (
        await session.execute(
            _APPLY_DELTAS,
            {
                "skus": [k[0] for k in keys],
                "whs": [k[1] for k in keys],
                "on_hand_deltas": [deltas[k][0] for k in keys],
                "reserved_deltas": [deltas[k][1] for k in keys],
            },
        )
    ).all()
    got = {(r.sku, r.warehouse_code): (int(r.on_hand), int(r.reserved)) for r in rows}
    for k in keys:
        if got.get(k) != (expected[k].on_hand, expected[k].reserved):
            # Cannot happen while the rows are locked; refusing is the safe side.
            raise RuntimeError(
                f"stock level {k} changed under a lock: got {got.get(k)}, planned {expected[k]}"
            )


# ------------------------------------------------------------------ reservations and lines

COLUMNS = "id, reference, state, expires_at, actor, created_at, updated_at"
_LINES = text(
    """SELECT reservation_id, line_no, sku, warehouse_code, tracked, quantity, backordered, fulfilled, released,
              kit_sku, quantity_per_kit
       FROM inventory.reservation_lines WHERE reservation_id = ANY(CAST(:ids AS uuid[]))
       ORDER BY reservation_id, line_no"""
)


async def with_lines(session: AsyncSession, rows: Sequence[Any]) -> list[Reservation]:
    """Reservations from their rows (COLUMNS), with their lines."""
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
                x.kit_sku or "",
                int(x.quantity_per_kit or 0),
            )
        )
    return [_from_row(r, lines.get(r.id, [])) for r in rows]


def _from_row(r: Any, lines: list[ReservationLine]) -> Reservation:
    """A reservation from a row of COLUMNS (attribute access) and its lines."""
    return Reservation(
        id=r.id,
        reference=r.reference,
        state=r.state,
        lines=lines,
        expires_at=r.expires_at,
        created_at=r.created_at,
        updated_at=r.updated_at,
        actor=r.actor,
    )


def _not_found(rid: uuid.UUID) -> NotFound:
    return NotFound("RESERVATION_NOT_FOUND", f"reservation {rid} does not exist", metadata={"id": str(rid)})


async def load(session: AsyncSession, rid: uuid.UUID, *, lock: bool) -> Reservation:
    sql = f"SELECT {COLUMNS} FROM inventory.reservations WHERE id = :id" + (" FOR UPDATE" if lock else "")
    row = (await session.execute(text(sql), {"id": rid})).one_or_none()
    if row is None:
        raise _not_found(rid)
    (res,) = await with_lines(session, [row])
    return res


async def page(
    session: AsyncSession, *, reference: str, state: str, after: tuple[datetime, uuid.UUID] | None, limit: int
) -> list[Reservation]:
    """By reference (exact) and/or state, oldest first, after a (created_at, id) key."""
    where = ["true"]
    params: dict[str, Any] = {"n": limit}
    if reference:
        where.append("reference = :ref")
        params["ref"] = reference
    if state:
        where.append("state = :state")
        params["state"] = state
    if after is not None:
        where.append("(created_at, id) > (CAST(:after_t AS timestamptz), CAST(:after_id AS uuid))")
        params["after_t"], params["after_id"] = after
    sql = f"SELECT {COLUMNS} FROM inventory.reservations WHERE {' AND '.join(where)} ORDER BY created_at, id LIMIT :n"
    return await with_lines(session, (await session.execute(text(sql), params)).all())


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


async def close_lines(session: AsyncSession, closes: Sequence[tuple[uuid.UUID, int, int, int]]) -> None:
    """(reservation id, line_no, fulfilled, released) more per line, guarded by the open quantity."""
    res = await session.execute(
        _CLOSE_LINES,
        {
            "rids": [c[0] for c in closes],
            "nos": [c[1] for c in closes],
            "fs": [c[2] for c in closes],
            "rs": [c[3] for c in closes],
        },
    )
    if len(res.all()) != len({(c[0], c[1]) for c in closes}):
        raise RuntimeError("reservation line changed under a lock")


async def consume_lots(
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


async def record_consumptions(session: AsyncSession, rows: Sequence[tuple[int, int, int, int, str]]) -> None:
    """(ledger id, lot id, quantity, unit cost, currency) per lot a movement consumed."""
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


_OPEN_AND_RELEASED = text(
    """SELECT l.reservation_id, min(r.reference) AS reference, sum(l.quantity - l.fulfilled - l.released) AS open,
              sum(l.released) AS rel, sum(LEAST(l.backordered, l.quantity - l.fulfilled - l.released)) AS backordered
       FROM inventory.reservation_lines l JOIN inventory.reservations r ON r.id = l.reservation_id
       WHERE l.reservation_id = ANY(CAST(:ids AS uuid[]))
       GROUP BY l.reservation_id"""
)


async def finish_states(
    session: AsyncSession, ids: Sequence[uuid.UUID], *, expired: bool
) -> list[ReservationChange]:
    """Closed reservations: fulfilled when every unit shipped, else released/expired.
    Returns what each reservation holds now, for its owner."""
    rows = (await session.execute(_OPEN_AND_RELEASED, {"ids": list(ids)})).all()
    states = {
        r.reservation_id: (
            "active" if r.open > 0 else ("expired" if expired else "released") if r.rel > 0 else "fulfilled"
        )
        for r in rows
    }
    await session.execute(_SET_STATE, {"ids": list(states), "states": list(states.values())})
    return [
        ReservationChange(
            str(r.reservation_id), r.reference, states[r.reservation_id], int(r.open), int(r.backordered)
        )
        for r in rows
    ]


async def now(session: AsyncSession) -> datetime:
    return (await session.execute(text("SELECT now()"))).scalar_one()  # type: ignore[no-any-return]


_EXTEND = text(
    """UPDATE inventory.reservations SET expires_at = now() + :us * interval '1 microsecond',
       updated_at = now() WHERE id = :id"""
)


async def set_expiry(session: AsyncSession, rid: uuid.UUID, ttl: timedelta) -> None:
    await session.execute(_EXTEND, {"us": ttl_us(ttl), "id": rid})


# ------------------------------------------------------------------ retarget

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
        RETURNING {", ".join("r." + c for c in COLUMNS.split(", "))}
    )
    SELECT u.*, ARRAY(
        SELECT row(line_no, sku, warehouse_code, tracked, quantity, backordered, fulfilled, released, kit_sku,
                   quantity_per_kit)
        FROM inventory.reservation_lines WHERE reservation_id = $1 ORDER BY line_no) AS lines
    FROM u
"""


def _line(r: Any) -> ReservationLine:
    return ReservationLine(
        int(r[0]), r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6]), int(r[7]), r[8] or "", int(r[9] or 0)
    )


async def retarget_active(
    conn: asyncpg.Connection[Any], rid: uuid.UUID, reference: str, actor: str, ttl: timedelta | None
) -> Reservation | None:
    """retarget in one statement; None when the reservation is missing, not
    active, expired, or changed since the statement's snapshot."""
    done = await conn.fetchrow(_RETARGET, rid, reference, actor, ttl_us(ttl))
    if done is None:
        return None
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


_LOCK_WITH_NOW = text(f"SELECT {COLUMNS}, now() AS now FROM inventory.reservations WHERE id = :id FOR UPDATE")
_RETARGET_LOCKED = text(
    f"""UPDATE inventory.reservations SET reference = :ref,
       actor = CASE WHEN :actor = '' THEN actor ELSE :actor END,
       expires_at = CASE WHEN CAST(:us AS bigint) IS NULL THEN NULL
                         ELSE now() + CAST(:us AS bigint) * interval '1 microsecond' END,
       updated_at = now() WHERE id = :id RETURNING {COLUMNS}"""
)


async def lock_with_now(session: AsyncSession, rid: uuid.UUID) -> tuple[Reservation, datetime]:
    row = (await session.execute(_LOCK_WITH_NOW, {"id": rid})).one_or_none()
    if row is None:
        raise _not_found(rid)
    (res,) = await with_lines(session, [row])
    return res, row.now


async def retarget_locked(
    session: AsyncSession, res: Reservation, reference: str, actor: str, ttl: timedelta | None
) -> Reservation:
    updated = (
        await session.execute(
            _RETARGET_LOCKED, {"ref": reference, "actor": actor, "us": ttl_us(ttl), "id": res.id}
        )
    ).one()
    return _from_row(updated, res.lines)


# ------------------------------------------------------------------ expiry

_EXPIRED = text(
    f"""SELECT {COLUMNS} FROM inventory.reservations
        WHERE state = 'active' AND expires_at <= now()
        ORDER BY expires_at LIMIT :limit FOR UPDATE SKIP LOCKED"""
)
SWEEPER_LOCK_KEY = 0x656E_7472_6570_01  # pg advisory lock: one sweeper at a time


async def lock_expired(session: AsyncSession, limit: int) -> list[Reservation]:
    """Up to `limit` expired active reservations, locked; SKIP LOCKED leaves those
    being worked on elsewhere for the next sweep."""
    return await with_lines(session, (await session.execute(_EXPIRED, {"limit": limit})).all())


async def try_sweeper_lock(session: AsyncSession) -> bool:
    """The transaction-scoped advisory lock that lets one replica sweep at a time."""
    got = (
        await session.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": SWEEPER_LOCK_KEY})
    ).scalar_one()
    return bool(got)
