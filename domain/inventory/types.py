"""Value objects of the inventory module (what the public functions return)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

# Allocation strategies of a channel (docs/allocation.md); "priority" is the default.
STRATEGIES = ("priority", "high_stock", "fewest_splits", "nearest")
MOVEMENT_TYPES = (
    "receive",
    "adjust",
    "set",
    "reserve",
    "release",
    "fulfil",
    "return",
    "import",
    "sync",
    "audit",
)
RESERVATION_STATES = ("active", "fulfilled", "released", "expired")
ADDRESS_FIELDS = ("line1", "line2", "city", "state", "county", "postal_code", "country_code")
CONTACT_FIELDS = ("name", "email", "phone")


@dataclass(frozen=True)
class Warehouse:
    code: str
    name: str
    # Keys: ADDRESS_FIELDS / CONTACT_FIELDS; missing keys mean "".
    address: dict[str, str]
    contact: dict[str, str]
    priority: int
    active: bool
    created_at: datetime
    updated_at: datetime
    location: GeoPoint | None = None


@dataclass(frozen=True)
class GeoPoint:
    """WGS 84 degrees."""

    latitude: float
    longitude: float


@dataclass(frozen=True)
class ChannelAllocation:
    """A channel's warehouses (in its order; empty = every active warehouse by
    priority) and its allocation strategy (one of STRATEGIES)."""

    channel: str
    warehouse_codes: tuple[str, ...] = ()
    strategy: str = "priority"
    updated_at: datetime | None = None


@dataclass(frozen=True)
class KitComponent:
    """`quantity` units of the item `sku` go into one unit of a kit."""

    sku: str
    quantity: int


@dataclass(frozen=True)
class Item:
    sku: str
    track_inventory: bool
    allow_backorder: bool
    max_backorder: int
    low_stock_threshold: int
    created_at: datetime
    updated_at: datetime
    # Non-empty: the item is a kit of these items and has no stock of its own (docs/kits.md).
    components: tuple[KitComponent, ...] = ()


@dataclass(frozen=True)
class StockLevel:
    sku: str
    warehouse_code: str
    on_hand: int
    reserved: int
    updated_at: datetime | None

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved

    @property
    def backordered(self) -> int:
        return max(0, self.reserved - self.on_hand)


@dataclass(frozen=True)
class SkuStock:
    sku: str
    levels: list[StockLevel]
    low_stock_threshold: int

    @property
    def on_hand(self) -> int:
        return sum(lv.on_hand for lv in self.levels)

    @property
    def reserved(self) -> int:
        return sum(lv.reserved for lv in self.levels)

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved

    @property
    def backordered(self) -> int:
        return sum(lv.backordered for lv in self.levels)

    @property
    def below_threshold(self) -> bool:
        return is_below_threshold(self.available, self.low_stock_threshold)

    @property
    def components(self) -> tuple[KitComponent, ...]:
        return ()


@dataclass(frozen=True)
class KitPart:
    """A component of a kit as the stock reads see it: its definition and its stock."""

    component: KitComponent
    tracked: bool
    stock: SkuStock


def kits_of(on_hand: int, reserved: int, per_kit: int) -> tuple[int, int]:
    """(kits the on-hand units build, kits the available units build) of one component."""
    return on_hand // per_kit, max(on_hand - reserved, 0) // per_kit


@dataclass(frozen=True)
class KitStock(SkuStock):
    """A kit's stock, derived from its components': in each warehouse and in
    total, the kits available are the minimum over tracked components of
    floor(available / required), and likewise for on hand; reserved is
    on_hand - available, so the one formula holds. `levels` are the per
    warehouse figures (build them with `kit_stock`); the totals are computed
    over the components' totals, not summed over warehouses (components of
    one kit may come from different warehouses)."""

    parts: tuple[KitPart, ...] = ()

    def _totals(self) -> tuple[int, int]:
        tracked = [p for p in self.parts if p.tracked]
        if not tracked:
            return 0, 0
        figures = [kits_of(p.stock.on_hand, p.stock.reserved, p.component.quantity) for p in tracked]
        return min(f[0] for f in figures), min(f[1] for f in figures)

    @property
    def on_hand(self) -> int:
        return self._totals()[0]

    @property
    def reserved(self) -> int:
        on_hand, available = self._totals()
        return on_hand - available

    @property
    def available(self) -> int:
        return self._totals()[1]

    @property
    def backordered(self) -> int:
        return 0

    @property
    def components(self) -> tuple[KitComponent, ...]:
        return tuple(p.component for p in self.parts)


def kit_stock(sku: str, low_stock_threshold: int, parts: Sequence[KitPart]) -> KitStock:
    """A kit's stock from its parts: one level per warehouse holding a level of
    any tracked component (a component without a level there counts as none)."""
    tracked = [p for p in parts if p.tracked]
    by_part = [{lv.warehouse_code: lv for lv in p.stock.levels} for p in tracked]
    codes = sorted({code for levels in by_part for code in levels})
    levels: list[StockLevel] = []
    for code in codes:
        on_hand_kits: list[int] = []
        available_kits: list[int] = []
        updated: list[datetime] = []
        for p, found in zip(tracked, by_part, strict=True):
            lv = found.get(code)
            oh, av = kits_of(lv.on_hand, lv.reserved, p.component.quantity) if lv else (0, 0)
            on_hand_kits.append(oh)
            available_kits.append(av)
            if lv is not None and lv.updated_at is not None:
                updated.append(lv.updated_at)
        oh, av = min(on_hand_kits), min(available_kits)
        levels.append(StockLevel(sku, code, oh, oh - av, max(updated) if updated else None))
    return KitStock(sku, levels, low_stock_threshold, tuple(parts))


def is_below_threshold(total_available: int, threshold: int) -> bool:
    """One rule everywhere: a threshold of 0 means none; at or below counts."""
    return threshold > 0 and total_available <= threshold


@dataclass(frozen=True)
class Cost:
    amount_minor: int
    currency: str


@dataclass(frozen=True)
class Movement:
    id: int
    sku: str
    warehouse_code: str
    type: str
    on_hand_before: int
    on_hand_after: int
    reserved_before: int
    reserved_after: int
    reason: str
    source: str
    actor: str
    reference: str
    reservation_id: uuid.UUID | None
    cost: Cost | None
    created_at: datetime
    kit_sku: str = ""  # the kit line of a reservation this component movement belongs to

    @property
    def on_hand_delta(self) -> int:
        return self.on_hand_after - self.on_hand_before

    @property
    def reserved_delta(self) -> int:
        return self.reserved_after - self.reserved_before


@dataclass(frozen=True)
class StockChange:
    level: StockLevel
    movement: Movement
    below_threshold: bool


@dataclass(frozen=True)
class Adjustment:
    sku: str
    warehouse_code: str
    delta: int
    reason: str = ""


@dataclass(frozen=True)
class LineRequest:
    """One requested line of a reservation; warehouse_code "" = allocate by priority."""

    sku: str
    quantity: int
    warehouse_code: str = ""


@dataclass(frozen=True)
class LineQuantity:
    """A quantity of one SKU (optionally one warehouse) inside a reservation."""

    sku: str
    quantity: int
    warehouse_code: str = ""


@dataclass(frozen=True)
class ReservationLine:
    line_no: int
    sku: str
    warehouse_code: str
    tracked: bool
    quantity: int
    backordered: int
    fulfilled: int
    released: int
    # A component line of a reserved kit: the kit, and the component's units per
    # kit as defined when it was reserved ("" and 0 for a plain line).
    kit_sku: str = ""
    quantity_per_kit: int = 0

    @property
    def open_quantity(self) -> int:
        return self.quantity - self.fulfilled - self.released


@dataclass(frozen=True)
class ReservationKit:
    """A kit line of a reservation, in kits (its component lines hold the units)."""

    sku: str
    quantity: int
    fulfilled: int
    released: int

    @property
    def open_quantity(self) -> int:
        return self.quantity - self.fulfilled - self.released


@dataclass(frozen=True)
class Reservation:
    id: uuid.UUID
    reference: str
    state: str
    lines: list[ReservationLine]
    expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    actor: str = ""

    @property
    def backordered(self) -> int:
        return sum(line.backordered for line in self.lines)

    @property
    def kits(self) -> list[ReservationKit]:
        """The kit lines, from their component lines (kits move whole, so every
        component gives the same figures; the smallest is taken)."""
        per: dict[str, dict[str, list[int]]] = {}
        for line in self.lines:
            if not line.kit_sku:
                continue
            sums = per.setdefault(line.kit_sku, {}).setdefault(line.sku, [0, 0, 0, line.quantity_per_kit])
            sums[0] += line.quantity
            sums[1] += line.fulfilled
            sums[2] += line.released
        return [
            ReservationKit(
                kit,
                min(s[0] // s[3] for s in comps.values()),
                min(s[1] // s[3] for s in comps.values()),
                min(s[2] // s[3] for s in comps.values()),
            )
            for kit, comps in per.items()
        ]

    def open_quantities(self) -> dict[str, int]:
        """Units still held per requested SKU: plain lines per SKU, kits in kits."""
        out: dict[str, int] = {}
        for line in self.lines:
            if not line.kit_sku and line.open_quantity:
                out[line.sku] = out.get(line.sku, 0) + line.open_quantity
        for kit in self.kits:
            if kit.open_quantity:
                out[kit.sku] = out.get(kit.sku, 0) + kit.open_quantity
        return out


@dataclass(frozen=True)
class ReservationChange:
    """What a reservation holds after a release, fulfilment or expiry: what its
    owner (the module named by its reference) is told in the same transaction."""

    reservation_id: str
    reference: str
    state: str
    open_quantity: int
    # Open units that were backordered (not on hand) when reserved.
    backordered_quantity: int


@dataclass(frozen=True)
class KitCost:
    """What a fulfilment shipped of one kit line: kits, and the sum of its
    component movements' FIFO lot costs (None when a component's units carried
    no cost or the costs are in different currencies)."""

    kit_sku: str
    quantity: int
    cost: Cost | None


@dataclass(frozen=True)
class Fulfilment:
    reservation: Reservation
    movements: list[Movement] = field(default_factory=list)
    kit_costs: list[KitCost] = field(default_factory=list)
