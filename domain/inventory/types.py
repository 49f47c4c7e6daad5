"""Value objects of the inventory module (what the public functions return)."""

from __future__ import annotations

import uuid
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
class Item:
    sku: str
    track_inventory: bool
    allow_backorder: bool
    max_backorder: int
    low_stock_threshold: int
    created_at: datetime
    updated_at: datetime


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
class Fulfilment:
    reservation: Reservation
    movements: list[Movement] = field(default_factory=list)
