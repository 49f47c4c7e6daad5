"""Kits on the reserve path (domain/inventory/kits.py) and a kit's derived stock (types.kit_stock)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from domain.inventory.allocation import WarehouseInfo, allocate
from domain.inventory.kits import Demand, attribute, expand
from domain.inventory.stock_rules import Level, Policy
from domain.inventory.types import (
    KitComponent,
    KitPart,
    LineRequest,
    Reservation,
    ReservationLine,
    SkuStock,
    StockLevel,
    kit_stock,
)
from domain.inventory.validation import MAX_QUANTITY
from domain.shared.errors import InvalidArgument

WH = [WarehouseInfo("A", 0, True), WarehouseInfo("B", 1, True)]
BIKE = {"bike": [KitComponent("frame", 1), KitComponent("wheel", 2)]}
POLICIES = {"frame": Policy(), "wheel": Policy(allow_backorder=True), "bell": Policy(track_inventory=False)}


def test_a_kit_line_becomes_its_components_lines_and_plain_lines_stay() -> None:
    lines, demands = expand([LineRequest("wheel", 1), LineRequest("bike", 3, "B")], BIKE)
    assert lines == [LineRequest("wheel", 1), LineRequest("frame", 3, "B"), LineRequest("wheel", 6, "B")]
    assert demands == [
        Demand("wheel", 1, ""),
        Demand("frame", 3, "B", "bike", 1),
        Demand("wheel", 6, "B", "bike", 2),
    ]


def test_a_kit_too_large_for_a_component_is_invalid() -> None:
    with pytest.raises(InvalidArgument) as err:
        expand([LineRequest("bike", MAX_QUANTITY)], BIKE)
    assert [v.field for v in err.value.field_violations] == ["lines[0].quantity"]


def test_allocations_are_told_back_to_the_lines_they_serve() -> None:
    # The kit's 4 wheels and 1 plain wheel pinned to B, over A (3 on hand) and B (3 on hand,
    # backorders allowed): the pinned demand takes B first, then the kit the rest.
    levels = {("frame", "A"): Level(5, 0), ("wheel", "A"): Level(3, 0), ("wheel", "B"): Level(3, 0)}
    lines, demands = expand([LineRequest("bike", 2), LineRequest("wheel", 1, "B")], BIKE)
    allocs = allocate(lines, POLICIES, WH, levels)
    pieces = attribute(demands, allocs)
    got = sorted(
        (a.sku, a.warehouse_code, a.kit_sku, a.quantity, a.backordered, a.quantity_per_kit) for a in pieces
    )
    assert got == [
        ("frame", "A", "bike", 2, 0, 1),
        ("wheel", "A", "bike", 3, 0, 2),
        ("wheel", "B", "", 1, 0, 0),
        ("wheel", "B", "bike", 1, 0, 2),
    ]
    # Every allocated unit is attributed once.
    for key in {(a.sku, a.warehouse_code) for a in allocs}:
        assert sum(p.quantity for p in pieces if (p.sku, p.warehouse_code) == key) == sum(
            a.quantity for a in allocs if (a.sku, a.warehouse_code) == key
        )


def test_backordered_units_go_to_the_demand_served_last() -> None:
    levels = {("frame", "A"): Level(5, 0), ("wheel", "A"): Level(3, 0)}
    lines, demands = expand([LineRequest("wheel", 2), LineRequest("bike", 1)], BIKE)
    pieces = attribute(demands, allocate(lines, POLICIES, WH, levels))
    got = sorted((a.sku, a.kit_sku, a.quantity, a.backordered) for a in pieces)
    assert got == [("frame", "bike", 1, 0), ("wheel", "", 2, 0), ("wheel", "bike", 2, 1)]


def test_a_kits_stock_is_the_minimum_over_tracked_components() -> None:
    frame = SkuStock("frame", [StockLevel("frame", "A", 3, 0, None), StockLevel("frame", "B", 1, 0, None)], 0)
    wheel = SkuStock("wheel", [StockLevel("wheel", "A", 5, 2, None), StockLevel("wheel", "B", 4, 0, None)], 0)
    bell = SkuStock("bell", [], 0)
    st = kit_stock(
        "bike",
        0,
        [
            KitPart(KitComponent("frame", 1), True, frame),
            KitPart(KitComponent("wheel", 2), True, wheel),
            KitPart(KitComponent("bell", 1), False, bell),  # untracked: never limits
        ],
    )
    # A: on hand min(3, 5//2) = 2, available min(3, 3//2) = 1; B: min(1, 2) = 1 both.
    assert [(lv.warehouse_code, lv.on_hand, lv.available) for lv in st.levels] == [("A", 2, 1), ("B", 1, 1)]
    # Totals over the components' totals: on hand min(4, 9//2), available min(4, 7//2).
    assert (st.on_hand, st.reserved, st.available, st.backordered) == (4, 1, 3, 0)
    assert [c.sku for c in st.components] == ["frame", "wheel", "bell"]


def test_a_reservation_counts_its_kits_in_kits() -> None:
    lines = [
        ReservationLine(1, "frame", "A", True, 3, 0, 1, 1, "bike", 1),
        ReservationLine(2, "wheel", "A", True, 4, 0, 2, 0, "bike", 2),
        ReservationLine(3, "wheel", "B", True, 2, 0, 0, 2, "bike", 2),
        ReservationLine(4, "wheel", "B", True, 5, 0, 0, 0),
    ]
    now = datetime.now(UTC)
    res = Reservation(uuid.uuid4(), "", "active", lines, None, now, now)
    (kit,) = res.kits
    assert (kit.sku, kit.quantity, kit.fulfilled, kit.released, kit.open_quantity) == ("bike", 3, 1, 1, 1)
    assert res.open_quantities() == {"wheel": 5, "bike": 1}
