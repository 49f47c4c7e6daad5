"""Stock levels: reads, and every non-reservation change (adjust, set, receive,
return, bulk). The counters only ever change through a conditional
UPDATE ... RETURNING; the ledger row and outbox event go in the same
transaction (ledger.write)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession

from domain.inventory import ledger
from domain.inventory import stock_store as store
from domain.inventory.channel_allocation import sellable_warehouses
from domain.inventory.types import (
    MOVEMENT_TYPES,
    Adjustment,
    Cost,
    KitPart,
    KitStock,
    Movement,
    SkuStock,
    StockChange,
    StockLevel,
    is_below_threshold,
    kit_stock,
)
from domain.inventory.validation import (
    MAX_LEVEL,
    MAX_MINOR,
    MAX_QUANTITY,
    check_quantity,
    check_sku,
    check_text,
    check_warehouse_code,
    filters_or_raise,
    sku_or_raise,
)
from domain.shared.db import driver_connection
from domain.shared.errors import (
    DomainError,
    FailedPrecondition,
    NotFound,
    PreconditionViolation,
    Violations,
)
from domain.shared.money import is_currency
from domain.shared.pagination import decode_token, encode_token, page_size

if TYPE_CHECKING:
    pass  # run-time import would be repeated in Temporal's workflow sandbox (crash)

MAX_BATCH_GET = 1000
MAX_BULK = 1000


async def _diagnose(
    session: AsyncSession, sku: str, wh: str, *, is_set: bool, qty: int, expected: int | None
) -> DomainError | None:
    """Why a conditional change matched no row; None when the level row is missing."""
    row = await store.level_facts(session, sku, wh)
    if row.item is None:
        return NotFound("ITEM_NOT_FOUND", f"inventory item {sku!r} does not exist", metadata={"sku": sku})
    if row.kit:
        return FailedPrecondition(
            "KIT_HAS_NO_STOCK",
            f"{sku!r} is a kit: its stock is its components' (change theirs)",
            metadata={"sku": sku},
            precondition_violations=[
                PreconditionViolation("KIT_HAS_NO_STOCK", sku, "a kit has no stock levels of its own")
            ],
        )
    if not row.warehouse:
        return NotFound("WAREHOUSE_NOT_FOUND", f"warehouse {wh!r} does not exist", metadata={"code": wh})
    if row.on_hand is None:
        return None
    on_hand, reserved = int(row.on_hand), int(row.reserved)
    meta = {"sku": sku, "warehouse_code": wh, "on_hand": str(on_hand), "reserved": str(reserved)}
    if expected is not None and on_hand != expected:
        return FailedPrecondition(
            "STOCK_CHANGED",
            f"on_hand of {sku!r} in {wh!r} is {on_hand}, not the expected {expected}",
            metadata=meta,
            precondition_violations=[
                PreconditionViolation("STOCK_CHANGED", sku, f"expected on_hand {expected}, current {on_hand}")
            ],
        )
    new = qty if is_set else on_hand + qty
    if new > MAX_LEVEL:
        return FailedPrecondition(
            "STOCK_LIMIT",
            f"on_hand of {sku!r} in {wh!r} would exceed {MAX_LEVEL}",
            metadata=meta,
            precondition_violations=[PreconditionViolation("STOCK_LIMIT", sku, f"on_hand would be {new}")],
        )
    if new < 0:
        return FailedPrecondition(
            "INSUFFICIENT_STOCK",
            f"on_hand of {sku!r} in {wh!r} would go below 0",
            metadata=meta,
            precondition_violations=[
                PreconditionViolation("INSUFFICIENT_STOCK", sku, f"on_hand {on_hand}, change {new - on_hand}")
            ],
        )
    return FailedPrecondition(
        "STOCK_RESERVED",
        f"on_hand of {sku!r} in {wh!r} would go below the {reserved} reserved units",
        metadata=meta,
        precondition_violations=[
            PreconditionViolation(
                "STOCK_RESERVED", sku, f"on_hand would be {new}, reserved {reserved}; backorder not allowed"
            )
        ],
    )


async def apply_stock_change(
    session: AsyncSession,
    *,
    sku: str,
    warehouse_code: str,
    kind: str,
    quantity: int,
    expected_on_hand: int | None = None,
    reason: str = "",
    source: str = "api",
    actor: str = "",
    reference: str = "",
    unit_cost: Cost | None = None,
    lot_code: str = "",
) -> StockChange:
    """Apply one counter change (adjust_stock, set_stock, receive_stock and return_stock call it).

    kind: "set" (on_hand := quantity, optional expected_on_hand), "adjust"
    (on_hand += quantity, non-zero), "receive" (+quantity and a lot when
    unit_cost is given), "return" (+quantity); the ledger row's type is the kind. Inputs must be validated and the SKU
    normalised by the caller (see validation.py). Raises NotFound for an
    unknown item/warehouse and FailedPrecondition (STOCK_CHANGED,
    INSUFFICIENT_STOCK, STOCK_RESERVED) when a rule refuses the change.
    """
    if kind not in ("set", "adjust", "receive", "return"):
        raise ValueError(f"unknown stock change kind {kind!r}")
    cost = None
    if unit_cost is not None and kind == "receive":
        cost = Cost(unit_cost.amount_minor * quantity, unit_cost.currency)
    level, draft = await _change_counter(
        session,
        sku=sku,
        warehouse_code=warehouse_code,
        is_set=kind == "set",
        quantity=quantity,
        expected_on_hand=expected_on_hand,
        type=kind,
        reason=reason,
        source=source,
        actor=actor,
        reference=reference,
        cost=cost,
    )
    (movement,) = await ledger.write(session, [draft])
    if unit_cost is not None and kind == "receive":
        await store.insert_lot(session, sku, warehouse_code, lot_code, quantity, unit_cost, movement.id)
    return StockChange(level=level, movement=movement, below_threshold=draft.below_threshold)


async def _change_counter(
    session: AsyncSession,
    *,
    sku: str,
    warehouse_code: str,
    is_set: bool,
    quantity: int,
    expected_on_hand: int | None,
    type: str,
    reason: str,
    source: str,
    actor: str,
    reference: str,
    cost: Cost | None = None,
) -> tuple[StockLevel, ledger.Draft]:
    """The conditional counter change; returns the new level and its ledger draft
    (the caller writes the draft in the same transaction)."""

    def change() -> Awaitable[Any | None]:
        return store.change_level(
            session, sku, warehouse_code, is_set=is_set, quantity=quantity, expected=expected_on_hand
        )

    row = await change()
    if row is None:
        err = await _diagnose(
            session, sku, warehouse_code, is_set=is_set, qty=quantity, expected=expected_on_hand
        )
        if err is not None:
            raise err
        # First change of this SKU in this warehouse: create the level, then apply.
        await store.ensure_level(session, sku, warehouse_code)
        row = await change()
        if row is None:
            err = await _diagnose(
                session, sku, warehouse_code, is_set=is_set, qty=quantity, expected=expected_on_hand
            )
            raise err or RuntimeError("stock level vanished during a change")
    draft = ledger.Draft(
        sku=sku,
        warehouse_code=warehouse_code,
        type=type,
        on_hand_before=int(row.on_hand_before),
        on_hand_after=int(row.on_hand_after),
        reserved_before=int(row.reserved_before),
        reserved_after=int(row.reserved_after),
        below_threshold=is_below_threshold(int(row.total_available), int(row.threshold)),
        reason=reason,
        source=source,
        actor=actor,
        reference=reference,
        cost=cost,
    )
    return StockLevel(
        sku, warehouse_code, int(row.on_hand_after), int(row.reserved_after), row.updated_at
    ), draft


def _check_common(v: Violations, sku: str, wh: str, reason: str, reference: str) -> str:
    norm = check_sku(v, "sku", sku)
    check_warehouse_code(v, "warehouse_code", wh)
    check_text(v, "reason", reason)
    check_text(v, "reference", reference)
    return norm


async def adjust_stock(
    session: AsyncSession,
    *,
    sku: str,
    warehouse_code: str,
    delta: int,
    reason: str = "",
    reference: str = "",
    actor: str = "",
    source: str = "api",
) -> StockChange:
    v = Violations()
    sku = _check_common(v, sku, warehouse_code, reason, reference)
    if delta == 0 or abs(delta) > MAX_QUANTITY:
        v.add("delta", f"must be non-zero and at most {MAX_QUANTITY} in magnitude")
    v.raise_if_any("the adjustment is invalid")
    return await apply_stock_change(
        session,
        sku=sku,
        warehouse_code=warehouse_code,
        kind="adjust",
        quantity=delta,
        reason=reason,
        source=source,
        actor=actor,
        reference=reference,
    )


async def set_stock(
    session: AsyncSession,
    *,
    sku: str,
    warehouse_code: str,
    quantity: int,
    expected_on_hand: int | None = None,
    reason: str = "",
    reference: str = "",
    actor: str = "",
    source: str = "api",
) -> StockChange:
    v = Violations()
    sku = _check_common(v, sku, warehouse_code, reason, reference)
    check_quantity(v, "quantity", quantity, minimum=0)
    if expected_on_hand is not None:
        check_quantity(v, "expected_on_hand", expected_on_hand, minimum=0)
    v.raise_if_any("the stock count is invalid")
    return await apply_stock_change(
        session,
        sku=sku,
        warehouse_code=warehouse_code,
        kind="set",
        quantity=quantity,
        expected_on_hand=expected_on_hand,
        reason=reason,
        source=source,
        actor=actor,
        reference=reference,
    )


async def receive_stock(
    session: AsyncSession,
    *,
    sku: str,
    warehouse_code: str,
    quantity: int,
    unit_cost: Cost | None,
    lot_code: str = "",
    reason: str = "",
    reference: str = "",
    actor: str = "",
    source: str = "api",
) -> StockChange:
    v = Violations()
    sku = _check_common(v, sku, warehouse_code, reason, reference)
    check_quantity(v, "quantity", quantity)
    check_text(v, "lot_code", lot_code, 128)
    if unit_cost is None:
        v.add("unit_cost", "is required: lots are costed FIFO on fulfilment")
    else:
        if not is_currency(unit_cost.currency):
            v.add("unit_cost.currency_code", f"{unit_cost.currency!r} is not a supported ISO-4217 code")
        if not 0 <= unit_cost.amount_minor <= MAX_QUANTITY:
            v.add("unit_cost.amount_minor", f"must be between 0 and {MAX_QUANTITY}")
        elif unit_cost.amount_minor * quantity > MAX_MINOR:
            v.add("unit_cost.amount_minor", "unit cost times quantity exceeds the largest amount")
    v.raise_if_any("the receipt is invalid")
    return await apply_stock_change(
        session,
        sku=sku,
        warehouse_code=warehouse_code,
        kind="receive",
        quantity=quantity,
        unit_cost=unit_cost,
        lot_code=lot_code,
        reason=reason,
        source=source,
        actor=actor,
        reference=reference,
    )


async def return_stock(
    session: AsyncSession,
    *,
    sku: str,
    warehouse_code: str,
    quantity: int,
    reason: str = "",
    reference: str = "",
    actor: str = "",
    source: str = "api",
) -> StockChange:
    v = Violations()
    sku = _check_common(v, sku, warehouse_code, reason, reference)
    check_quantity(v, "quantity", quantity)
    v.raise_if_any("the return is invalid")
    return await apply_stock_change(
        session,
        sku=sku,
        warehouse_code=warehouse_code,
        kind="return",
        quantity=quantity,
        reason=reason,
        source=source,
        actor=actor,
        reference=reference,
    )


async def bulk_adjust_stock(
    session: AsyncSession,
    adjustments: Sequence[Adjustment],
    *,
    reference: str = "",
    actor: str = "",
    source: str = "api",
) -> list[StockChange]:
    """All or nothing. Every refused line is reported (one violation each,
    subject `adjustments[i]`); the caller's transaction must then roll back,
    which raising guarantees under rt.mutate / UnitOfWork."""
    v = Violations()
    if not 1 <= len(adjustments) <= MAX_BULK:
        v.add("adjustments", f"must hold 1 to {MAX_BULK} adjustments")
    check_text(v, "reference", reference)
    norm: list[Adjustment] = []
    for i, a in enumerate(adjustments):
        sku = check_sku(v, f"adjustments[{i}].sku", a.sku)
        check_warehouse_code(v, f"adjustments[{i}].warehouse_code", a.warehouse_code)
        if a.delta == 0 or abs(a.delta) > MAX_QUANTITY:
            v.add(f"adjustments[{i}].delta", f"must be non-zero and at most {MAX_QUANTITY} in magnitude")
        check_text(v, f"adjustments[{i}].reason", a.reason)
        norm.append(Adjustment(sku, a.warehouse_code, a.delta, a.reason))
    v.raise_if_any("the bulk adjustment is invalid")
    # Apply in (sku, warehouse) order so concurrent bulk calls lock rows in
    # one global order (no deadlocks); answer in request order.
    order = sorted(range(len(norm)), key=lambda i: (norm[i].sku, norm[i].warehouse_code, i))
    done: dict[int, tuple[StockLevel, ledger.Draft]] = {}
    refused: list[tuple[int, DomainError]] = []
    for i in order:
        a = norm[i]
        try:
            done[i] = await _change_counter(
                session,
                sku=a.sku,
                warehouse_code=a.warehouse_code,
                is_set=False,
                quantity=a.delta,
                expected_on_hand=None,
                type="adjust",
                reason=a.reason,
                source=source,
                actor=actor,
                reference=reference,
            )
        except DomainError as err:  # collected: every failing line is reported below
            refused.append((i, err))
    if refused:
        refused.sort(key=lambda r: r[0])
        reasons = {e.reason for _, e in refused}
        raise FailedPrecondition(
            reasons.pop() if len(reasons) == 1 else "BULK_ADJUSTMENT_REFUSED",
            f"{len(refused)} of {len(norm)} adjustments were refused; nothing was applied",
            metadata={"refused": str(len(refused))},
            precondition_violations=[
                PreconditionViolation(e.reason, f"adjustments[{i}]", f"{norm[i].sku}: {e.message}")
                for i, e in refused
            ],
        )
    # One ledger + outbox statement for the whole request, in application order.
    movements = await ledger.write(session, [done[i][1] for i in order])
    changes = {
        i: StockChange(level=done[i][0], movement=m, below_threshold=done[i][1].below_threshold)
        for i, m in zip(order, movements, strict=True)
    }
    return [changes[i] for i in range(len(norm))]


# ---------------------------------------------------------------- reads


async def load_sku_stocks(session: AsyncSession, skus: list[str]) -> dict[str, SkuStock]:
    """Levels of many SKUs in one statement (unknown SKUs are absent)."""
    return await store.fetch_sku_stocks(await driver_connection(session), skus)


def _item_not_found(sku: str) -> NotFound:
    return NotFound("ITEM_NOT_FOUND", f"inventory item {sku!r} does not exist", metadata={"sku": sku})


async def stock_of(load_one: Callable[[str], Awaitable[SkuStock | None]], sku: str) -> SkuStock:
    """GetStockLevel without a warehouse filter, through a loader that coalesces
    concurrent calls into one load_sku_stocks statement (the P1 hot path)."""
    sku = sku_or_raise(sku)
    st = await load_one(sku)
    if st is None:
        raise _item_not_found(sku)
    return st


def _within(st: SkuStock, warehouses: Collection[str] | None) -> SkuStock:
    """The SKU's stock over these warehouses only (None: all of them); a kit's
    is derived again from its components' stock over those warehouses."""
    if warehouses is None:
        return st
    if isinstance(st, KitStock):
        return kit_stock(
            st.sku,
            st.low_stock_threshold,
            [KitPart(p.component, p.tracked, _within(p.stock, warehouses)) for p in st.parts],
        )
    return SkuStock(
        st.sku, [lv for lv in st.levels if lv.warehouse_code in warehouses], st.low_stock_threshold
    )


async def _channel_warehouses(session: AsyncSession, channel: str) -> frozenset[str] | None:
    return frozenset(await sellable_warehouses(session, channel)) if channel else None


async def get_stock_level(
    session: AsyncSession, sku: str, warehouse_code: str = "", *, channel: str = ""
) -> SkuStock:
    """One SKU: per warehouse and in total (only `warehouse_code` when given;
    only the warehouses `channel` sells from when given)."""
    sku = sku_or_raise(sku)
    filters_or_raise(warehouse_code=warehouse_code)
    allowed = await _channel_warehouses(session, channel)
    stocks = await load_sku_stocks(session, [sku])
    if sku not in stocks:
        raise _item_not_found(sku)
    st = _within(stocks[sku], allowed)
    if warehouse_code and isinstance(st, KitStock):
        st = _within(st, frozenset({warehouse_code}))
    if warehouse_code:
        levels = [lv for lv in st.levels if lv.warehouse_code == warehouse_code]
        if not levels:
            if allowed is not None and warehouse_code not in allowed:
                levels = []
            elif not await store.warehouse_exists(session, warehouse_code):
                raise NotFound(
                    "WAREHOUSE_NOT_FOUND",
                    f"warehouse {warehouse_code!r} does not exist",
                    metadata={"code": warehouse_code},
                )
            else:
                levels = [StockLevel(sku, warehouse_code, 0, 0, None)]
        if isinstance(st, KitStock):
            return KitStock(sku, levels, st.low_stock_threshold, st.parts)
        st = SkuStock(sku, levels, st.low_stock_threshold)
    return st


async def batch_get_stock_levels(
    session: AsyncSession, skus: Sequence[str], *, channel: str = ""
) -> tuple[list[SkuStock], list[str]]:
    """Up to 1,000 SKUs; returns (stocks in first-mention order, unknown SKUs);
    with `channel`, over the warehouses it sells from."""
    v = Violations()
    if not 1 <= len(skus) <= MAX_BATCH_GET:
        v.add("skus", f"must hold 1 to {MAX_BATCH_GET} SKUs")
    wanted: list[str] = []
    seen: set[str] = set()
    for i, raw in enumerate(skus):
        sku = check_sku(v, f"skus[{i}]", raw)
        if sku not in seen:
            seen.add(sku)
            wanted.append(sku)
    v.raise_if_any("the request is invalid")
    allowed = await _channel_warehouses(session, channel)
    stocks = await load_sku_stocks(session, wanted)
    return [_within(stocks[s], allowed) for s in wanted if s in stocks], [
        s for s in wanted if s not in stocks
    ]


async def list_stock_levels(
    session: AsyncSession,
    *,
    size: int,
    token: str,
    warehouse_code: str = "",
    sku_prefix: str = "",
    below_threshold_only: bool = False,
    backordered_only: bool = False,
    channel: str = "",
) -> tuple[list[StockLevel], str]:
    """Levels ordered by (sku, warehouse_code), keyset-paginated; with `channel`,
    only the levels of the warehouses it sells from."""
    filters_or_raise(warehouse_code=warehouse_code, sku_prefix=sku_prefix)
    n = page_size(size)
    filters: list[object] = ["levels", warehouse_code, sku_prefix, below_threshold_only, backordered_only]
    if channel:
        filters.append(channel)
    after = decode_token(token, filters)
    allowed = await _channel_warehouses(session, channel)
    levels = await store.levels_page(
        session,
        warehouse_code=warehouse_code,
        warehouse_codes=None if allowed is None else sorted(allowed),
        sku_prefix=sku_prefix,
        below_threshold_only=below_threshold_only,
        backordered_only=backordered_only,
        after=None if after is None else (str(after[0]), str(after[1])),
        limit=n + 1,
    )
    if not backordered_only:  # a kit is never backordered
        upper = (levels[-1].sku, levels[-1].warehouse_code) if len(levels) > n else None
        kit_levels = await _kit_levels_between(
            session,
            after=None if after is None else (str(after[0]), str(after[1])),
            upper=upper,
            sku_prefix=sku_prefix,
            warehouse_code=warehouse_code,
            allowed=allowed,
            below_threshold_only=below_threshold_only,
        )
        if kit_levels:
            levels = sorted([*levels, *kit_levels], key=lambda lv: (lv.sku, lv.warehouse_code))[: n + 1]
    more = len(levels) > n
    levels = levels[:n]
    nxt = encode_token([levels[-1].sku, levels[-1].warehouse_code], filters) if more else ""
    return levels, nxt


async def _kit_levels_between(
    session: AsyncSession,
    *,
    after: tuple[str, str] | None,
    upper: tuple[str, str] | None,
    sku_prefix: str,
    warehouse_code: str,
    allowed: frozenset[str] | None,
    below_threshold_only: bool,
) -> list[StockLevel]:
    """The derived levels of the kits whose keys fall after `after` and up to `upper`
    (a page of level rows covers that range; None: to the end), with the page's filters.
    One probe of the kits index when there are none."""
    kits = await store.kits_in_range(
        session, low=after[0] if after else "", high=upper[0] if upper else None, prefix=sku_prefix
    )
    if not kits:
        return []
    stocks = await load_sku_stocks(session, kits)
    out: list[StockLevel] = []
    for sku in kits:
        st = stocks.get(sku)
        if st is None or (below_threshold_only and not st.below_threshold):
            continue
        for lv in _within(st, allowed).levels:
            key = (lv.sku, lv.warehouse_code)
            if warehouse_code and lv.warehouse_code != warehouse_code:
                continue
            if (after is None or key > after) and (upper is None or key <= upper):
                out.append(lv)
    return out


async def list_movements(
    session: AsyncSession,
    *,
    size: int,
    token: str,
    sku: str = "",
    warehouse_code: str = "",
    types: Sequence[str] = (),
    reference: str = "",
    reservation_id: uuid.UUID | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> tuple[list[Movement], str]:
    """The ledger, newest first, keyset-paginated on id."""
    filters_or_raise(warehouse_code=warehouse_code, reference=reference)
    v = Violations()
    if sku:
        sku = check_sku(v, "sku", sku)
    for i, t in enumerate(types):
        if t not in MOVEMENT_TYPES:
            v.add(f"types[{i}]", f"unknown movement type {t!r}")
    if start and end and end < start:
        v.add("end_time", "must not be before start_time")
    v.raise_if_any("the filter is invalid")
    n = page_size(size)
    filters = [
        "moves",
        sku,
        warehouse_code,
        sorted(types),
        reference,
        str(reservation_id),
        str(start),
        str(end),
    ]
    after = decode_token(token, filters)
    moves = await store.movements_page(
        session,
        sku=sku,
        warehouse_code=warehouse_code,
        types=list(types),
        reference=reference,
        reservation_id=reservation_id,
        start=start,
        end=end,
        before_id=None if after is None else int(after),
        limit=n + 1,
    )
    more = len(moves) > n
    moves = moves[:n]
    return moves, (encode_token(moves[-1].id, filters) if more else "")
