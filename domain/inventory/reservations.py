"""Reservations: reserve (one or many requests per transaction), extend,
retarget, read. Closing them (release, fulfil, expiry) is
reservation_closing.py. The statements live in reservation_store.py.

Invariant: per level, `reserved` == sum of open quantities of tracked
reservation lines. Every path changes both in the same transaction, with
guarded UPDATEs whose row counts are checked.

Lock order (no deadlocks): reservation rows first, then stock levels of the
involved SKUs in (sku, warehouse_code) order, then lots.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession

from domain.inventory import kits, ledger
from domain.inventory import reservation_store as store
from domain.inventory.allocation import Alloc, Key, allocate
from domain.inventory.reservation_store import PlanInputs
from domain.inventory.stock_rules import Level
from domain.inventory.types import (
    RESERVATION_STATES,
    GeoPoint,
    LineRequest,
    Reservation,
    ReservationLine,
    is_below_threshold,
)
from domain.inventory.validation import (
    check_geo_point,
    check_quantity,
    check_sku,
    check_text,
    check_warehouse_code,
    filters_or_raise,
)
from domain.platform.idempotency import Answers, Claim
from domain.shared.db import driver_connection
from domain.shared.errors import (
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    Violations,
)
from domain.shared.ids import new_id
from domain.shared.pagination import decode_token, encode_token, page_size

if TYPE_CHECKING:
    import asyncpg  # run-time import would be repeated in Temporal's workflow sandbox (crash)

MAX_LINES = 500
MAX_TTL = timedelta(days=30)


@dataclass(frozen=True)
class ReserveRequest:
    """A validated reservation request (build it with `reserve_request`)."""

    lines: tuple[LineRequest, ...]
    reference: str = ""
    ttl: timedelta | None = None
    actor: str = ""
    source: str = "api"
    channel: str = ""  # allocate within this channel's warehouses, by its strategy ("" = none)
    destination: GeoPoint | None = None  # for the NEAREST strategy


def reserve_request(
    lines: Sequence[LineRequest],
    *,
    reference: str = "",
    ttl: timedelta | None = None,
    actor: str = "",
    source: str = "api",
    channel: str = "",
    destination: GeoPoint | None = None,
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
    check_text(v, "channel", channel, 64)
    if destination is not None:
        check_geo_point(v, "destination", destination)
    v.raise_if_any("the reservation request is invalid")
    return ReserveRequest(tuple(norm), reference, ttl, actor, source, channel, destination)


# ------------------------------------------------------------------ reserve

Plan = list[Alloc] | DomainError | None  # granted allocation, refusal, or not executed (key used before)
Outcome = Reservation | DomainError | None


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
    store_answers: Callable[[list[Outcome]], Answers] | None = None,
) -> list[Outcome]:
    """Reserve for several independent requests in the caller's transaction.

    `claims[i]` (batcher) is request i's idempotency key, claimed in the load
    statement (keys in sorted order); a request whose key was already present
    is not executed and its result is None (the caller replays the stored answer).

    Each request is all or nothing; requests are granted in order while stock
    lasts (the group-commit batcher relies on this). Per request the result is
    the Reservation or the DomainError that refused it (nothing written for it).
    Two statements in the common case: load+lock, then write everything.
    `store_answers` (batcher) turns the results into idempotency answers
    written in the same statement.
    """
    prepared = await prepare_claimed(session, requests, claims)
    await prepared.write(store_answers(prepared.results) if store_answers is not None else Answers())
    return prepared.results


@dataclass
class Prepared:
    """Reservations planned and granted under their levels' locks, not written
    yet (`prepare_claimed`): `results` as reserve_claimed returns them; `write`
    writes the granted ones (one statement) with the idempotency answers given."""

    results: list[Outcome]
    session: AsyncSession
    conn: asyncpg.Connection[Any]
    granted: list[Reservation]
    reserved: dict[Key, int]
    expected: dict[Key, Level]
    drafts: list[ledger.Draft]

    async def write(self, answers: Answers) -> None:
        if self.granted:
            await store.write_granted(
                self.session, self.conn, self.granted, self.reserved, self.expected, self.drafts, answers
            )
        elif answers.claims:
            await store.store_answers(self.conn, answers)


async def prepare_claimed(
    session: AsyncSession, requests: Sequence[ReserveRequest], claims: Sequence[Claim | None]
) -> Prepared:
    """reserve_claimed's first statement (claim, lock, load) and its plan, the
    write left to `Prepared.write`: the caller may write rows of its own in
    between, the levels staying locked."""
    conn = await driver_connection(session)
    inputs, plans = await _plan(conn, requests, claims)
    running = {k: Level(v.on_hand, v.reserved) for k, v in inputs.levels.items()}
    results, granted, reserved, drafts = _grant(requests, plans, inputs, running)
    return Prepared(results, session, conn, granted, reserved, running, drafts)


async def prepare_reserve(session: AsyncSession, request: ReserveRequest, claim: Claim | None) -> Prepared:
    """`reserve` in two steps (see prepare_claimed) for one request, whose
    result (`results[0]`) is its Reservation or the DomainError that refuses
    it (not raised). With `claim`, the first statement makes the RPC's
    idempotency claim: KeyTaken when its request_id was used before."""
    prepared = await prepare_claimed(session, [request], [claim])
    if claim is not None:
        claim.made(prepared.results[0] is not None)
    return prepared


async def _plan(
    conn: asyncpg.Connection[Any], requests: Sequence[ReserveRequest], claims: Sequence[Claim | None]
) -> tuple[PlanInputs, list[Plan]]:
    """Lock the levels (claiming the keys) and allocate each request in order.
    A backorder into a level that never had stock creates the level and plans
    again under the lock (the new row was not locked when we planned)."""
    skus = sorted({line.sku for r in requests for line in r.lines})
    channels = sorted({r.channel for r in requests if r.channel})
    to_claim = sorted((c for c in claims if c is not None), key=lambda c: c.key)
    claimed: set[tuple[str, str]] = set()
    for attempt in range(2):
        inputs = await store.load_for_plan(conn, skus, to_claim if attempt == 0 else (), channels)
        if attempt == 0:
            claimed = inputs.claimed
        state = {k: Level(v.on_hand, v.reserved) for k, v in inputs.levels.items()}
        plans: list[Plan] = []
        for req, claim in zip(requests, claims, strict=True):
            if claim is not None and claim.key not in claimed:
                plans.append(None)  # key already present: not executed, replayed by the caller
                continue
            try:
                plans.append(_allocate(req, inputs, state))
            except DomainError as err:  # this request is refused; the others go on
                plans.append(err)
        missing = sorted(
            {
                (a.sku, a.warehouse_code)
                for p in plans
                if p is not None and not isinstance(p, DomainError)
                for a in p
                if a.tracked and (a.sku, a.warehouse_code) not in inputs.levels
            }
        )
        if not missing:
            inputs.claimed = claimed
            return inputs, plans
        await store.ensure_levels(conn, missing)
    raise RuntimeError("stock levels kept appearing while reserving")


def _allocate(req: ReserveRequest, inputs: PlanInputs, state: dict[Key, Level]) -> list[Alloc]:
    """One request's plan. Kit lines become their components' demand first
    (kits.expand: summed with the request's other demand for those SKUs), and
    the allocations are told back to the kit lines they serve (kits.attribute)."""
    kit_lines = bool(inputs.kits) and any(line.sku in inputs.kits for line in req.lines)
    lines, demands = kits.expand(req.lines, inputs.kits) if kit_lines else (req.lines, [])
    allocs = allocate(
        lines,
        inputs.policies,
        inputs.warehouses,
        state,
        channel=inputs.channels.get(req.channel),
        destination=req.destination,
    )
    return kits.attribute(demands, allocs) if kit_lines else allocs


def _grant(
    requests: Sequence[ReserveRequest], plans: Sequence[Plan], inputs: PlanInputs, running: dict[Key, Level]
) -> tuple[list[Outcome], list[Reservation], dict[Key, int], list[ledger.Draft]]:
    """The reservations the plans grant, in grant order, moving `running` along:
    per request its outcome; the granted ones; units reserved per level; one
    ledger movement per tracked line with exact before/after."""
    totals = available_by_sku(running)
    drafts: list[ledger.Draft] = []
    reserved: dict[Key, int] = {}
    results: list[Outcome] = []
    granted: list[Reservation] = []
    for req, plan in zip(requests, plans, strict=True):
        if plan is None or isinstance(plan, DomainError):
            results.append(plan)
            continue
        rid = new_id()
        for a in plan:
            if not a.tracked:
                continue
            key = (a.sku, a.warehouse_code)
            lv = running[key]
            before = lv.reserved
            lv.reserved += a.quantity
            totals[a.sku] -= a.quantity
            reserved[key] = reserved.get(key, 0) + a.quantity
            drafts.append(
                ledger.Draft(
                    sku=a.sku,
                    warehouse_code=a.warehouse_code,
                    type="reserve",
                    on_hand_before=lv.on_hand,
                    on_hand_after=lv.on_hand,
                    reserved_before=before,
                    reserved_after=lv.reserved,
                    below_threshold=is_below_threshold(
                        totals[a.sku], inputs.policies[a.sku].low_stock_threshold
                    ),
                    reason="reserved",
                    source=req.source,
                    actor=req.actor,
                    reference=req.reference,
                    reservation_id=rid,
                    kit_sku=a.kit_sku,
                )
            )
        res = Reservation(
            id=rid,
            reference=req.reference,
            state="active",
            lines=[
                ReservationLine(
                    n,
                    a.sku,
                    a.warehouse_code,
                    a.tracked,
                    a.quantity,
                    a.backordered,
                    0,
                    0,
                    a.kit_sku,
                    a.quantity_per_kit,
                )
                for n, a in enumerate(plan, start=1)
            ],
            expires_at=None if req.ttl is None else inputs.now + req.ttl,
            created_at=inputs.now,
            updated_at=inputs.now,
            actor=req.actor,
        )
        results.append(res)
        granted.append(res)
    return results, granted, reserved, drafts


def available_by_sku(levels: dict[Key, Level]) -> dict[str, int]:
    """Available units per SKU over its levels (the below-threshold flag reads them)."""
    out: dict[str, int] = {}
    for (sku, _), lv in levels.items():
        out[sku] = out.get(sku, 0) + lv.available
    return out


async def reserve(
    session: AsyncSession,
    lines: Sequence[LineRequest],
    *,
    reference: str = "",
    ttl: timedelta | None = None,
    actor: str = "",
    warehouse_code: str = "",
    source: str = "api",
    channel: str = "",
    destination: GeoPoint | None = None,
) -> Reservation:
    """Reserve in the caller's transaction (all or nothing). `warehouse_code`
    pins every line without its own warehouse to that warehouse; `channel`
    allocates only from that channel's warehouses, by its strategy."""
    if warehouse_code:
        lines = [LineRequest(x.sku, x.quantity, x.warehouse_code or warehouse_code) for x in lines]
    req = reserve_request(
        lines,
        reference=reference,
        ttl=ttl,
        actor=actor,
        source=source,
        channel=channel,
        destination=destination,
    )
    (result,) = await reserve_many(session, [req])
    if isinstance(result, DomainError):
        raise result
    return result


# ------------------------------------------------------------------ reading


def parse_reservation_id(raw: str | uuid.UUID) -> uuid.UUID:
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


async def get_reservation(session: AsyncSession, reservation_id: str | uuid.UUID) -> Reservation:
    return await store.load(session, parse_reservation_id(reservation_id), lock=False)


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
    key = None if after is None else (datetime.fromisoformat(str(after[0])), uuid.UUID(str(after[1])))
    found = await store.page(session, reference=reference, state=state, after=key, limit=n + 1)
    more = len(found) > n
    found = found[:n]
    nxt = encode_token([found[-1].created_at.isoformat(), str(found[-1].id)], filters) if more else ""
    return found, nxt


# ------------------------------------------------------------------ hold time and owner


def refuse_unless_holding(res: Reservation, now: datetime) -> None:
    """RESERVATION_NOT_ACTIVE or RESERVATION_EXPIRED unless `res` still holds its stock."""
    if res.state != "active":
        raise FailedPrecondition(
            "RESERVATION_NOT_ACTIVE", f"reservation {res.id} is {res.state}", metadata={"state": res.state}
        )
    if res.expires_at is not None and res.expires_at <= now:
        raise FailedPrecondition(
            "RESERVATION_EXPIRED", f"reservation {res.id} has expired", metadata={"id": str(res.id)}
        )


async def load_holding(session: AsyncSession, rid: uuid.UUID) -> Reservation:
    """The reservation, locked, when it still holds its stock (refuse_unless_holding)."""
    res = await store.load(session, rid, lock=True)
    refuse_unless_holding(res, await store.now(session))
    return res


async def extend(
    session: AsyncSession, reservation_id: str | uuid.UUID, ttl: timedelta, *, actor: str = ""
) -> Reservation:
    """A new hold time from now, for an active reservation that has not expired."""
    rid = parse_reservation_id(reservation_id)
    if not timedelta(0) < ttl <= MAX_TTL:
        raise InvalidArgument(
            "INVALID_ARGUMENT", "ttl must be positive and at most 30 days", field_violations=[]
        )
    await load_holding(session, rid)
    await store.set_expiry(session, rid, ttl)
    return await store.load(session, rid, lock=False)


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
    rid = parse_reservation_id(reservation_id)
    v = Violations()
    check_text(v, "reference", reference, 256)
    if ttl is not None and not timedelta(0) < ttl <= MAX_TTL:
        v.add("ttl", "must be positive and at most 30 days")
    v.raise_if_any("the request is invalid")
    # Checkout runs this while it holds locks: one statement on the driver
    # connection in the common case, the locking read below otherwise.
    done = await store.retarget_active(await driver_connection(session), rid, reference, actor, ttl)
    if done is not None:
        return done
    # Missing, not active, expired, or changed since the statement's snapshot:
    # lock it, then look (three statements).
    res, now = await store.lock_with_now(session, rid)
    refuse_unless_holding(res, now)
    return await store.retarget_locked(session, res, reference, actor, ttl)
