"""Pure rules of the stock streams: event validation and watch filters."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from domain.inventory.sync import MAX_BATCH, SyncEvent, check_source, prepare, validate_event
from domain.inventory.types import Cost
from domain.inventory.watch import StockEvent, make_filter, to_stock_event
from domain.shared.errors import InvalidArgument
from domain.shared.outbox import StoredEvent


def reason(e: SyncEvent) -> str | None:
    ok, err = validate_event(e)
    assert (ok is None) != (err is None)
    return err.reason if err else None


def test_event_validation_reasons() -> None:
    assert reason(SyncEvent("1", "SKU", "W1", "set", 0, occurred_us=1)) is None
    assert reason(SyncEvent("1", "SKU", "W1", "set", -1, occurred_us=1)) == "NEGATIVE_QUANTITY"
    assert reason(SyncEvent("1", "SKU", "W1", "set", 5)) == "MISSING_OCCURRED_AT"
    assert reason(SyncEvent("1", "SKU", "W1", "adjust", 0)) == "INVALID_QUANTITY"
    assert reason(SyncEvent("1", "SKU", "W1", "adjust", -4)) is None
    assert reason(SyncEvent("1", "SKU", "W1", "receive", 0)) == "INVALID_QUANTITY"
    assert reason(SyncEvent("1", "SKU", "W1", "unspecified", 1)) == "UNKNOWN_KIND"
    assert reason(SyncEvent("1", "", "W1", "adjust", 1)) == "INVALID_SKU"
    assert reason(SyncEvent("1", "SKU", "bad code", "adjust", 1)) == "INVALID_WAREHOUSE_CODE"
    assert (
        reason(SyncEvent("1", "SKU", "W1", "adjust", 1, unit_cost=Cost(1, "EUR"))) == "UNEXPECTED_UNIT_COST"
    )
    assert reason(SyncEvent("1", "SKU", "W1", "receive", 1, unit_cost=Cost(1, "XXX1"))) == "INVALID_UNIT_COST"
    assert reason(SyncEvent("1", "SKU", "W1", "receive", 1, unit_cost=Cost(100, "EUR"))) is None


def test_sku_is_normalised() -> None:
    ok, _ = validate_event(SyncEvent("1", "Cafe\u0301", "W1", "adjust", 1))
    assert ok is not None and ok.sku == "Caf\u00e9"


def test_prepare_checks_a_batch_without_the_database() -> None:
    batch = prepare(
        [
            SyncEvent("a", "Cafe\u0301", "W1", "adjust", 1),
            SyncEvent("", "S", "W1", "adjust", 1),  # no usable id: reported, never recorded
            SyncEvent("b", "S", "W1", "adjust", 0),  # invalid: rejected with its reason
            SyncEvent("a", "S", "W2", "adjust", 5),  # repeated id: the first occurrence wins
            SyncEvent("c", "S", "W2", "set", 3, occurred_us=7),
            SyncEvent("x" * 129, "S", "W1", "adjust", 1),
        ]
    )
    assert (batch.size, batch.last_event_id, batch.duplicate) == (6, "x" * 129, 1)
    assert [e.reason for e in batch.invalid_ids] == ["INVALID_EVENT_ID", "INVALID_EVENT_ID"]
    assert batch.order == ["a", "b", "c"]
    assert [(e.event_id, e.sku, e.warehouse_code) for e in batch.valid] == [
        ("a", "Caf\u00e9", "W1"),
        ("c", "S", "W2"),
    ]
    assert {k: e.reason for k, e in batch.rejected.items()} == {"b": "INVALID_QUANTITY"}
    assert sorted(batch.skus) == ["Caf\u00e9", "S"]
    assert sorted(batch.warehouses) == ["W1", "W2"]
    for size in (0, MAX_BATCH + 1):
        with pytest.raises(InvalidArgument):
            prepare([SyncEvent(str(i), "S", "W1", "adjust", 1) for i in range(size)])


def test_source_names() -> None:
    assert check_source("wms-paris") == "wms-paris"
    for bad in ("", " x", "x" * 129, "a\nb"):
        with pytest.raises(InvalidArgument):
            check_source(bad)


def _event(sku: str, wh: str, below: bool) -> StockEvent:
    return StockEvent(
        event_id=1,
        sku=sku,
        warehouse_code=wh,
        type="sync",
        on_hand_delta=1,
        reserved_delta=0,
        on_hand=1,
        reserved=0,
        available=1,
        reason="",
        time=datetime.now(UTC),
        below_threshold=below,
        movement_id=1,
        first_movement_id=1,
    )


def test_watch_filters() -> None:
    f = make_filter(["A"], ["W1"], below_threshold_only=True)
    assert f.matches(_event("A", "W1", True))
    assert not f.matches(_event("A", "W1", False))
    assert not f.matches(_event("B", "W1", True))
    assert not f.matches(_event("A", "W2", True))
    assert make_filter([], [], False).matches(_event("Z", "W9", False))
    with pytest.raises(InvalidArgument):
        make_filter([" bad "], [], False)


def test_an_event_names_the_movements_it_covers() -> None:
    """A level's event covers ledger ids first_ledger_id..ledger_id; an event
    written before first_ledger_id existed covers its one movement."""

    def stored(payload: dict[str, object]) -> StoredEvent:
        return StoredEvent(9, 1, "inventory.stock_changed", "sku", "A", None, payload, datetime.now(UTC))

    batch = to_stock_event(stored({"sku": "A", "ledger_id": 17, "first_ledger_id": 12, "on_hand_delta": 5}))
    assert (batch.first_movement_id, batch.movement_id, batch.on_hand_delta) == (12, 17, 5)
    old = to_stock_event(stored({"sku": "A", "ledger_id": 17}))
    assert (old.first_movement_id, old.movement_id) == (17, 17)
