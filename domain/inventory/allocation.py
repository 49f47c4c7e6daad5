"""Pure allocation rules: which warehouses a reservation takes stock from.

No I/O here: the caller locks the levels it passes in (so the plan is exact)
and still applies it with a guarded UPDATE (so a wrong plan can never oversell).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass

from domain.inventory.stock_rules import Level, Policy, within_allowance
from domain.inventory.types import LineRequest
from domain.shared.errors import FailedPrecondition, NotFound, PreconditionViolation

Key = tuple[str, str]  # (sku, warehouse_code)


@dataclass(frozen=True)
class WarehouseInfo:
    code: str
    priority: int
    active: bool


@dataclass
class Alloc:
    sku: str
    warehouse_code: str
    quantity: int
    backordered: int
    tracked: bool


def sum_lines(lines: Sequence[LineRequest]) -> list[LineRequest]:
    """Lines of the same (SKU, warehouse) summed, in first-mention order."""
    totals: dict[Key, int] = {}
    for line in lines:
        key = (line.sku, line.warehouse_code)
        totals[key] = totals.get(key, 0) + line.quantity
    return [LineRequest(sku, q, wh) for (sku, wh), q in totals.items()]


def allocate(
    lines: Sequence[LineRequest],
    policies: Mapping[str, Policy],
    warehouses: Sequence[WarehouseInfo],
    levels: MutableMapping[Key, Level],
) -> list[Alloc]:
    """Plan one request, all or nothing.

    `warehouses` in allocation order (priority, code). On success `levels`
    is updated (reserved grows) and the allocations are returned, one per
    (SKU, warehouse). On failure `levels` is untouched and a DomainError is
    raised: INSUFFICIENT_STOCK carries one violation per short SKU.
    """
    by_code = {w.code: w for w in warehouses}
    active = [w.code for w in warehouses if w.active]
    extra: dict[Key, int] = {}  # tentative reserved increase
    allocs: dict[Key, Alloc] = {}
    requested: dict[str, int] = {}
    short: dict[str, int] = {}
    seen_avail: dict[str, dict[str, int]] = {}

    def level(key: Key) -> Level:
        base = levels.get(key) or Level()
        return Level(base.on_hand, base.reserved + extra.get(key, 0))

    def add(key: Key, q: int, bo: int, tracked: bool) -> None:
        a = allocs.get(key)
        if a is None:
            allocs[key] = Alloc(key[0], key[1], q, bo, tracked)
        else:
            a.quantity += q
            a.backordered += bo
        if tracked:
            extra[key] = extra.get(key, 0) + q

    for line in sum_lines(lines):
        sku, q, wh = line.sku, line.quantity, line.warehouse_code
        policy = policies.get(sku)
        if policy is None:
            raise NotFound("ITEM_NOT_FOUND", f"inventory item {sku!r} does not exist", metadata={"sku": sku})
        if wh:
            w = by_code.get(wh)
            if w is None:
                raise NotFound(
                    "WAREHOUSE_NOT_FOUND", f"warehouse {wh!r} does not exist", metadata={"code": wh}
                )
            if not w.active:
                raise FailedPrecondition(
                    "WAREHOUSE_INACTIVE", f"warehouse {wh!r} is deactivated", metadata={"code": wh}
                )
            candidates = [wh]
        else:
            candidates = active
        requested[sku] = requested.get(sku, 0) + q
        if not policy.track_inventory:
            # Untracked: always succeeds, holds nothing on the counters.
            add((sku, wh or (active[0] if active else "")), q, 0, False)
            continue
        avail = seen_avail.setdefault(sku, {})
        remaining = q
        for code in candidates:
            lv = level((sku, code))
            avail.setdefault(code, max(lv.available, 0))
            take = min(remaining, max(lv.available, 0))
            if take:
                add((sku, code), take, 0, True)
                remaining -= take
            if not remaining:
                break
        if remaining and policy.allow_backorder and candidates:
            # Backorders go to the first candidate; max_backorder bounds how far
            # reserved may exceed on_hand there (0 = unlimited).
            target = (sku, candidates[0])
            lv = level(target)
            if within_allowance(lv.on_hand, lv.reserved + remaining, policy):
                add(target, remaining, remaining, True)
                remaining = 0
        if remaining:
            short[sku] = short.get(sku, 0) + remaining

    if short:
        violations = []
        for sku in short:
            available = sum(seen_avail.get(sku, {}).values())
            violations.append(
                PreconditionViolation(
                    "INSUFFICIENT_STOCK", sku, f"requested {requested[sku]}, available {available}"
                )
            )
        raise FailedPrecondition(
            "INSUFFICIENT_STOCK",
            f"not enough stock for {len(short)} SKU(s); nothing was reserved",
            metadata={"skus": ",".join(short)},
            precondition_violations=violations,
        )
    for key, q in extra.items():
        base = levels.setdefault(key, Level())
        base.reserved += q
    return list(allocs.values())
