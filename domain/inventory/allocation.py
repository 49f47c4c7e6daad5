"""Pure allocation rules: which warehouses a reservation takes stock from.

A line without a warehouse takes what it can from each candidate warehouse in
turn; the candidates are the channel's warehouses (its list, or every active
warehouse by (priority, code)) in the order of the channel's strategy:
priority (that order), high_stock (most available of the SKU first),
fewest_splits (greedy cover: the warehouse serving the most units of the
request alone, then the most of what is left, ...), nearest (great-circle
distance from the request's destination; no location last). Ties always fall
back to the priority order. docs/allocation.md has the rules with examples.

No I/O here: the caller locks the levels it passes in (so the plan is exact)
and still applies it with a guarded UPDATE (so a wrong plan can never oversell).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass

from domain.inventory.stock_rules import Level, Policy, within_allowance
from domain.inventory.types import ChannelAllocation, GeoPoint, LineRequest
from domain.shared.errors import FailedPrecondition, NotFound, PreconditionViolation

Key = tuple[str, str]  # (sku, warehouse_code)


@dataclass(frozen=True)
class WarehouseInfo:
    code: str
    priority: int
    active: bool
    location: GeoPoint | None = None


@dataclass
class Alloc:
    sku: str
    warehouse_code: str
    quantity: int
    backordered: int
    tracked: bool
    kit_sku: str = ""  # a component of this kit line (kits.attribute)
    quantity_per_kit: int = 0


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
    *,
    channel: ChannelAllocation | None = None,
    destination: GeoPoint | None = None,
) -> list[Alloc]:
    """Plan one request, all or nothing.

    `warehouses` in allocation order (priority, code). With `channel`, only
    the channel's warehouses, in its order, by its strategy. On success `levels`
    is updated (reserved grows) and the allocations are returned, one per
    (SKU, warehouse). On failure `levels` is untouched and a DomainError is
    raised: INSUFFICIENT_STOCK carries one violation per short SKU.
    """
    plan = _Plan(policies, warehouses, levels, channel)
    summed = sum_lines(lines)
    plan.order_for(summed, destination)
    for line in summed:
        plan.line(line.sku, line.quantity, line.warehouse_code)
    plan.raise_if_short()
    for key, q in plan.extra.items():
        base = levels.setdefault(key, Level())
        base.reserved += q
    return list(plan.allocs.values())


class _Plan:
    """One request's allocations so far, over the levels as they would be after them."""

    def __init__(
        self,
        policies: Mapping[str, Policy],
        warehouses: Sequence[WarehouseInfo],
        levels: Mapping[Key, Level],
        channel: ChannelAllocation | None = None,
    ) -> None:
        self.policies = policies
        self.by_code = {w.code: w for w in warehouses}
        self.channel = channel
        # The warehouses the request may use, in PRIORITY order: the channel's
        # list (active ones), or every active warehouse by (priority, code).
        self.allowed: frozenset[str] | None = None
        if channel is not None and channel.warehouse_codes:
            self.allowed = frozenset(channel.warehouse_codes)
            self.active = [c for c in channel.warehouse_codes if c in self.by_code and self.by_code[c].active]
        else:
            self.active = [w.code for w in warehouses if w.active]
        self.strategy = channel.strategy if channel is not None else "priority"
        self.order: list[str] | None = None  # the request's order (fewest_splits, nearest); None: per SKU
        self.levels = levels
        self.extra: dict[Key, int] = {}  # tentative reserved increase
        self.allocs: dict[Key, Alloc] = {}
        self.requested: dict[str, int] = {}
        self.short: dict[str, int] = {}
        self.seen_available: dict[str, dict[str, int]] = {}

    def line(self, sku: str, quantity: int, warehouse_code: str) -> None:
        policy = self.policies.get(sku)
        if policy is None:
            raise NotFound("ITEM_NOT_FOUND", f"inventory item {sku!r} does not exist", metadata={"sku": sku})
        candidates = self._candidates(warehouse_code, sku)
        self.requested[sku] = self.requested.get(sku, 0) + quantity
        if not policy.track_inventory:
            # Untracked: always succeeds, holds nothing on the counters.
            self._add((sku, warehouse_code or (candidates[0] if candidates else "")), quantity, 0, False)
            return
        remaining = self._take_available(sku, quantity, candidates)
        if remaining and policy.allow_backorder and candidates:
            remaining = self._backorder((sku, candidates[0]), remaining, policy)
        if remaining:
            self.short[sku] = self.short.get(sku, 0) + remaining

    def order_for(self, lines: Sequence[LineRequest], destination: GeoPoint | None) -> None:
        """The strategies whose order holds for the whole request, computed once before its lines."""
        if self.strategy == "nearest" and destination is not None:
            self.order = _by_distance(
                self.active, [self.by_code[c].location for c in self.active], destination
            )
        elif self.strategy == "fewest_splits":
            demand: dict[str, int] = {}
            for line in lines:
                policy = self.policies.get(line.sku)
                if not line.warehouse_code and policy is not None and policy.track_inventory:
                    demand[line.sku] = demand.get(line.sku, 0) + line.quantity
            self.order = self._greedy_cover(demand)

    def _greedy_cover(self, demand: dict[str, int]) -> list[str]:
        """Fewest shipments, greedily: each next warehouse serves the most units still missing."""
        left = dict(demand)
        rest = list(self.active)
        order: list[str] = []
        while rest and any(left.values()):
            scores = [sum(min(q, self._free((sku, code))) for sku, q in left.items()) for code in rest]
            best = max(range(len(rest)), key=lambda i: (scores[i], -i))
            if scores[best] == 0:
                break
            code = rest.pop(best)
            order.append(code)
            for sku, q in left.items():
                left[sku] = q - min(q, self._free((sku, code)))
        return order + rest

    def _free(self, key: Key) -> int:
        return max(self._level(key).available, 0)

    def _candidates(self, warehouse_code: str, sku: str = "") -> list[str]:
        """The warehouses a line may take from: the one it names, or the channel's
        active ones in the strategy's order."""
        if not warehouse_code:
            if self.order is not None:
                return self.order
            if self.strategy == "high_stock":
                # sorted() is stable: equal stock keeps the priority order.
                return sorted(self.active, key=lambda code: -self._free((sku, code)))
            return self.active
        w = self.by_code.get(warehouse_code)
        if w is None:
            raise NotFound(
                "WAREHOUSE_NOT_FOUND",
                f"warehouse {warehouse_code!r} does not exist",
                metadata={"code": warehouse_code},
            )
        if self.allowed is not None and warehouse_code not in self.allowed:
            slug = self.channel.channel if self.channel else ""
            raise FailedPrecondition(
                "WAREHOUSE_NOT_IN_CHANNEL",
                f"channel {slug!r} does not sell from warehouse {warehouse_code!r}",
                metadata={"code": warehouse_code, "channel": slug},
            )
        if not w.active:
            raise FailedPrecondition(
                "WAREHOUSE_INACTIVE",
                f"warehouse {warehouse_code!r} is deactivated",
                metadata={"code": warehouse_code},
            )
        return [warehouse_code]

    def _take_available(self, sku: str, quantity: int, candidates: Sequence[str]) -> int:
        """Take what is available, warehouse by warehouse; the quantity still missing."""
        seen = self.seen_available.setdefault(sku, {})
        remaining = quantity
        for code in candidates:
            available = max(self._level((sku, code)).available, 0)
            seen.setdefault(code, available)
            take = min(remaining, available)
            if take:
                self._add((sku, code), take, 0, True)
                remaining -= take
            if not remaining:
                break
        return remaining

    def _backorder(self, key: Key, quantity: int, policy: Policy) -> int:
        """Backorders go to the first candidate, within the item's allowance; the quantity still missing."""
        lv = self._level(key)
        if not within_allowance(lv.on_hand, lv.reserved + quantity, policy):
            return quantity
        self._add(key, quantity, quantity, True)
        return 0

    def _level(self, key: Key) -> Level:
        base = self.levels.get(key) or Level()
        return Level(base.on_hand, base.reserved + self.extra.get(key, 0))

    def _add(self, key: Key, quantity: int, backordered: int, tracked: bool) -> None:
        a = self.allocs.get(key)
        if a is None:
            self.allocs[key] = Alloc(key[0], key[1], quantity, backordered, tracked)
        else:
            a.quantity += quantity
            a.backordered += backordered
        if tracked:
            self.extra[key] = self.extra.get(key, 0) + quantity

    def raise_if_short(self) -> None:
        if not self.short:
            return
        violations = [
            PreconditionViolation(
                "INSUFFICIENT_STOCK",
                sku,
                f"requested {self.requested[sku]}, available {sum(self.seen_available.get(sku, {}).values())}",
            )
            for sku in self.short
        ]
        raise FailedPrecondition(
            "INSUFFICIENT_STOCK",
            f"not enough stock for {len(self.short)} SKU(s); nothing was reserved",
            metadata={"skus": ",".join(self.short)},
            precondition_violations=violations,
        )


EARTH_RADIUS_KM = 6371.0088


def distance_km(a: GeoPoint, b: GeoPoint) -> float:
    """Great-circle (haversine) distance."""
    la1, lo1, la2, lo2 = map(math.radians, (a.latitude, a.longitude, b.latitude, b.longitude))
    h = math.sin((la2 - la1) / 2) ** 2 + math.cos(la1) * math.cos(la2) * math.sin((lo2 - lo1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(min(1.0, h)))


def _by_distance(codes: Sequence[str], locations: Sequence[GeoPoint | None], to: GeoPoint) -> list[str]:
    """Nearest first; no location last; ties keep the given order (sorted() is stable)."""
    keyed = [
        (loc is None, 0.0 if loc is None else distance_km(loc, to), code)
        for code, loc in zip(codes, locations, strict=True)
    ]
    return [code for _, _, code in sorted(keyed, key=lambda k: (k[0], k[1]))]
