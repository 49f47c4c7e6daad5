"""Conveniences for InventoryService on top of the generated client (`ep.inventory`).

from entrepot_client import Entrepot, FailedPreconditionError
from entrepot_client.inventory import reserve, shortages

async with Entrepot(target, token) as ep:
    try:
        res = await reserve(ep, [("SKU-1", 2), ("SKU-2", 1)], reference="order:42", ttl_seconds=900)
    except FailedPreconditionError as err:
        print(shortages(err))   # {"SKU-1": "requested 2, available 1"}

    async for drift in audit(ep, warehouse_codes=["PAR-1"]):   # needs inventory.admin
        print(drift.sku, drift.kind, drift.counter, drift.derived)
        await repair(ep, drift, reason="restored backup of 2026-05-01")
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from google.protobuf import duration_pb2

from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot_client.errors import EntrepotError

Line = tuple[str, int] | tuple[str, int, str]  # (sku, quantity[, warehouse_code])


def reserve_request(
    lines: Iterable[Line],
    *,
    reference: str = "",
    ttl_seconds: float = 0,
    request_id: str | None = None,
    destination: tuple[float, float] | None = None,
) -> pb.ReserveStockRequest:
    """A ReserveStockRequest with a fresh request_id unless one is given (keep it for retries).
    `destination`: (latitude, longitude), for channels with the NEAREST strategy."""
    req = pb.ReserveStockRequest(
        lines=[
            pb.ReservationLineRequest(sku=x[0], quantity=x[1], warehouse_code=x[2] if len(x) > 2 else "")  # type: ignore[misc]
            for x in lines
        ],
        reference=reference,
        request_id=request_id or uuid.uuid4().hex,
    )
    if ttl_seconds:
        req.ttl.CopyFrom(duration_pb2.Duration(seconds=int(ttl_seconds), nanos=int((ttl_seconds % 1) * 1e9)))
    if destination is not None:
        req.destination.CopyFrom(pb.GeoPoint(latitude=destination[0], longitude=destination[1]))
    return req


async def reserve(
    ep: Any,
    lines: Iterable[Line],
    *,
    reference: str = "",
    ttl_seconds: float = 0,
    request_id: str | None = None,
    timeout: float | None = None,
    destination: tuple[float, float] | None = None,
) -> pb.Reservation:
    """All or nothing; raises FailedPreconditionError (reason INSUFFICIENT_STOCK) when short.
    On a client bound to a channel (x-channel-slug), only that channel's warehouses are used."""
    req = reserve_request(
        lines, reference=reference, ttl_seconds=ttl_seconds, request_id=request_id, destination=destination
    )
    return await ep.inventory.reserve_stock(req, timeout=timeout)  # type: ignore[no-any-return]


def shortages(err: EntrepotError) -> dict[str, str]:
    """SKU -> "requested N, available M" from an INSUFFICIENT_STOCK error."""
    return {v.subject: v.description for v in err.precondition_violations if v.type == "INSUFFICIENT_STOCK"}


def available(stock: pb.SkuStock, warehouse_code: str = "") -> int:
    """available = on_hand - reserved, for the SKU or one of its warehouses."""
    if not warehouse_code:
        return stock.available
    return sum(lv.available for lv in stock.warehouses if lv.warehouse_code == warehouse_code)


async def audit(
    ep: Any,
    *,
    skus: Iterable[str] = (),
    warehouse_codes: Iterable[str] = (),
    kinds: Iterable[pb.StockDriftKind.ValueType] = (),
    page_size: int = 500,
    whole_ledger: bool = False,
    timeout: float | None = None,
) -> AsyncIterator[pb.StockDrift]:
    """Every drift AuditStock reports, following the pages (empty: no drift);
    `whole_ledger`: sum every level's whole ledger (AuditStockRequest.whole_ledger)."""
    req = pb.AuditStockRequest(
        page_size=page_size,
        skus=list(skus),
        warehouse_codes=list(warehouse_codes),
        kinds=list(kinds),
        whole_ledger=whole_ledger,
    )
    while True:
        page = await ep.inventory.audit_stock(req, timeout=timeout)
        for drift in page.drifts:
            yield drift
        if not page.next_page_token:
            return
        req.page_token = page.next_page_token


async def repair(
    ep: Any, drift: pb.StockDrift, *, reason: str, request_id: str | None = None, timeout: float | None = None
) -> pb.RepairStockResponse:
    """RepairStock for a drift as audited (its figures are the expected ones): a fresh
    request_id unless one is given (keep it for retries). FailedPreconditionError
    (reason STOCK_CHANGED) when the level moved since: audit again."""
    req = pb.RepairStockRequest(
        sku=drift.sku,
        warehouse_code=drift.warehouse_code,
        kind=drift.kind,
        expected_counter=drift.counter,
        expected_derived=drift.derived,
        reason=reason,
        request_id=request_id or uuid.uuid4().hex,
    )
    return await ep.inventory.repair_stock(req, timeout=timeout)  # type: ignore[no-any-return]


async def set_channel_allocation(
    ep: Any,
    channel: str,
    warehouse_codes: Iterable[str],
    strategy: str = "priority",
    *,
    request_id: str | None = None,
) -> pb.ChannelAllocation:
    """The channel's warehouses in its order (empty: every active warehouse by priority) and its
    strategy: "priority", "high_stock", "fewest_splits" or "nearest"."""
    req = pb.SetChannelAllocationRequest(
        allocation=pb.ChannelAllocation(
            channel=channel,
            warehouse_codes=list(warehouse_codes),
            strategy=pb.AllocationStrategy.Value("ALLOCATION_STRATEGY_" + strategy.upper()),
        ),
        request_id=request_id or uuid.uuid4().hex,
    )
    return await ep.inventory.set_channel_allocation(req)  # type: ignore[no-any-return]


async def set_kit_components(
    ep: Any, sku: str, components: Mapping[str, int], *, request_id: str | None = None
) -> pb.InventoryItem:
    """Make `sku` a kit of `components` (component SKU -> units per kit), replacing its
    definition; an empty mapping makes it a simple item again (docs/kits.md)."""
    req = pb.SetKitComponentsRequest(
        sku=sku,
        components=[pb.KitComponent(sku=c, quantity=q) for c, q in components.items()],
        request_id=request_id or uuid.uuid4().hex,
    )
    return await ep.inventory.set_kit_components(req)  # type: ignore[no-any-return]
