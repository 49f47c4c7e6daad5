"""Pure allocation rules (domain/inventory/allocation.py) and SKU validation."""

from __future__ import annotations

import pytest

from domain.inventory.allocation import Alloc, WarehouseInfo, allocate, distance_km, sum_lines
from domain.inventory.stock_rules import Level, Policy
from domain.inventory.types import ChannelAllocation, GeoPoint, LineRequest
from domain.inventory.validation import normalize_sku
from domain.shared.errors import FailedPrecondition, NotFound

WH = [WarehouseInfo("A", 0, True), WarehouseInfo("B", 1, True), WarehouseInfo("OFF", 2, False)]


def test_same_sku_lines_are_summed_in_first_mention_order() -> None:
    got = sum_lines([LineRequest("x", 1), LineRequest("y", 2), LineRequest("x", 3)])
    assert got == [LineRequest("x", 4), LineRequest("y", 2)]


def test_split_by_priority_skips_inactive_and_updates_levels() -> None:
    levels = {("x", "A"): Level(2, 1), ("x", "B"): Level(5, 0), ("x", "OFF"): Level(100, 0)}
    allocs = allocate([LineRequest("x", 4)], {"x": Policy()}, WH, levels)
    assert [(a.warehouse_code, a.quantity, a.backordered) for a in allocs] == [("A", 1, 0), ("B", 3, 0)]
    assert levels[("x", "A")].reserved == 2 and levels[("x", "B")].reserved == 3


def test_refusal_reports_each_short_sku_and_changes_nothing() -> None:
    levels = {("x", "A"): Level(1, 0), ("y", "B"): Level(1, 0)}
    with pytest.raises(FailedPrecondition) as err:
        allocate(
            [LineRequest("x", 1), LineRequest("x", 1), LineRequest("y", 3)],
            {"x": Policy(), "y": Policy()},
            WH,
            levels,
        )
    assert err.value.reason == "INSUFFICIENT_STOCK"
    assert [(v.subject, v.description) for v in err.value.precondition_violations] == [
        ("x", "requested 2, available 1"),
        ("y", "requested 3, available 1"),
    ]
    assert levels[("x", "A")].reserved == 0


def test_backorder_bounded_by_max_and_placed_first_warehouse() -> None:
    levels = {("x", "A"): Level(1, 0)}
    pol = {"x": Policy(allow_backorder=True, max_backorder=2)}
    allocs = allocate([LineRequest("x", 3)], pol, WH, levels)
    assert [(a.warehouse_code, a.quantity, a.backordered) for a in allocs] == [("A", 3, 2)]
    with pytest.raises(FailedPrecondition):
        allocate([LineRequest("x", 1)], pol, WH, levels)


def test_untracked_always_succeeds_and_explicit_warehouse_rules() -> None:
    levels: dict[tuple[str, str], Level] = {}
    allocs = allocate([LineRequest("u", 50)], {"u": Policy(track_inventory=False)}, WH, levels)
    assert allocs[0].tracked is False and allocs[0].warehouse_code == "A" and levels == {}
    with pytest.raises(NotFound):
        allocate([LineRequest("x", 1, "ZZ")], {"x": Policy()}, WH, levels)
    with pytest.raises(FailedPrecondition) as err:
        allocate([LineRequest("x", 1, "OFF")], {"x": Policy()}, WH, levels)
    assert err.value.reason == "WAREHOUSE_INACTIVE"
    with pytest.raises(NotFound):
        allocate([LineRequest("nope", 1)], {}, WH, levels)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("ABC-1", "ABC-1"),
        ("CAFE\u0301", "CAF\u00c9"),
        ("", None),
        (" a", None),
        ("a\tb", None),
        ("x" * 129, None),
    ],
)
def test_sku_normalisation(raw: str, expected: str | None) -> None:
    assert normalize_sku(raw) == expected


# ------------------------------------------------------------------ channels and strategies

CH_WH = [
    WarehouseInfo("A", 0, True, GeoPoint(48.8566, 2.3522)),  # Paris
    WarehouseInfo("B", 1, True, GeoPoint(45.7640, 4.8357)),  # Lyon
    WarehouseInfo("C", 2, True),  # no location
    WarehouseInfo("OFF", 3, False),
]


def _where(allocs: list[Alloc]) -> list[tuple[str, str, int]]:
    return [(a.sku, a.warehouse_code, a.quantity) for a in allocs]


def test_a_channel_list_restricts_and_orders_the_warehouses() -> None:
    levels = {
        ("x", "A"): Level(5, 0),
        ("x", "B"): Level(1, 0),
        ("x", "C"): Level(9, 0),
        ("x", "OFF"): Level(9, 0),
    }
    ch = ChannelAllocation("shop", ("B", "OFF", "A"))
    assert _where(allocate([LineRequest("x", 3)], {"x": Policy()}, CH_WH, levels, channel=ch)) == [
        ("x", "B", 1),
        ("x", "A", 2),
    ]
    with pytest.raises(FailedPrecondition) as short:
        allocate(
            [LineRequest("x", 4)], {"x": Policy()}, CH_WH, levels, channel=ch
        )  # C's 9 are not the shop's
    assert short.value.reason == "INSUFFICIENT_STOCK"
    with pytest.raises(FailedPrecondition) as outside:
        allocate([LineRequest("x", 1, "C")], {"x": Policy()}, CH_WH, levels, channel=ch)
    assert outside.value.reason == "WAREHOUSE_NOT_IN_CHANNEL"


def test_an_empty_list_keeps_every_active_warehouse_by_priority() -> None:
    levels = {("x", "A"): Level(1, 0), ("x", "B"): Level(1, 0)}
    got = allocate([LineRequest("x", 2)], {"x": Policy()}, CH_WH, levels, channel=ChannelAllocation("shop"))
    assert _where(got) == [("x", "A", 1), ("x", "B", 1)]


def test_high_stock_fewest_splits_and_nearest_orders() -> None:
    def levels() -> dict[tuple[str, str], Level]:
        return {
            ("x", "A"): Level(5, 0),
            ("x", "B"): Level(3, 0),
            ("y", "B"): Level(3, 0),
            ("y", "C"): Level(5, 0),
        }

    pol = {"x": Policy(), "y": Policy()}
    lines = [LineRequest("x", 3), LineRequest("y", 3)]
    by = {s: ChannelAllocation("shop", (), s) for s in ("priority", "high_stock", "fewest_splits", "nearest")}
    assert _where(allocate(lines, pol, CH_WH, levels(), channel=by["priority"])) == [
        ("x", "A", 3),
        ("y", "B", 3),
    ]
    assert _where(allocate(lines, pol, CH_WH, levels(), channel=by["high_stock"])) == [
        ("x", "A", 3),
        ("y", "C", 3),
    ]
    assert _where(allocate(lines, pol, CH_WH, levels(), channel=by["fewest_splits"])) == [
        ("x", "B", 3),
        ("y", "B", 3),
    ]
    marseille = GeoPoint(43.2965, 5.3698)
    near = allocate(lines, pol, CH_WH, levels(), channel=by["nearest"], destination=marseille)
    assert _where(near) == [("x", "B", 3), ("y", "B", 3)]  # Lyon is closer than Paris; C has no location
    assert _where(allocate(lines, pol, CH_WH, levels(), channel=by["nearest"])) == [
        ("x", "A", 3),
        ("y", "B", 3),
    ]


def test_distance_is_great_circle() -> None:
    paris, lyon = GeoPoint(48.8566, 2.3522), GeoPoint(45.7640, 4.8357)
    assert 390 < distance_km(paris, lyon) < 394
    assert distance_km(paris, paris) == 0
