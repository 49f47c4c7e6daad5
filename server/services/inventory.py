"""InventoryService servicer: thin; rules live in domain/inventory.

ReserveStock goes through the group-commit batcher (domain/inventory/batcher.py)
unless ENTREPOT_RESERVE_BATCHING=false; the batcher claims and stores the
idempotency key itself with rt.mutate's exact semantics (same digest, same
principal/method, same replay). SyncStock, GetSyncCursor and
WatchStockChanges are in inventory_streams.py (InventoryStreamsMixin).
"""

from __future__ import annotations

from typing import TypeAlias

import grpc

from domain import inventory as inv
from domain.platform import idempotency
from domain.shared.coalesce import Coalescer
from domain.shared.errors import DomainError, InvalidArgument
from domain.shared.uow import UnitOfWork
from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot.inventory.v1 import inventory_pb2_grpc
from server import metrics
from server.context import bound_channel, current_caller, current_method
from server.convert import from_duration, from_ts_field, mask_paths
from server.errors import status_from_domain
from server.runtime import Runtime, request_digest
from server.services.inventory_convert import (
    STATE_FROM_PROTO,
    address_to_dict,
    change_to_proto,
    channel_allocation_to_proto,
    contact_to_dict,
    drift_kind,
    drift_kinds,
    drift_to_proto,
    geo_point_from_proto,
    item_to_proto,
    kit_components,
    level_to_proto,
    money,
    movement_to_proto,
    movement_types,
    quantities,
    repair_to_proto,
    reservation_to_proto,
    sku_stock_to_proto,
    strategy_from_proto,
    warehouse_to_proto,
)
from server.services.inventory_streams import InventoryStreamsMixin

Ctx: TypeAlias = grpc.aio.ServicerContext  # type: ignore[type-arg]


def _encode(result: inv.Reservation | DomainError) -> tuple[int, bytes]:
    """How a batched outcome is stored for replay (same format as rt.mutate)."""
    if isinstance(result, DomainError):
        status = status_from_domain(result)
        return status.code, status.SerializeToString()
    return 0, reservation_to_proto(result).SerializeToString()


class InventoryServicer(InventoryStreamsMixin, inventory_pb2_grpc.InventoryServiceServicer):
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        s = rt.settings
        # Concurrent GetStockLevel calls share one autocommit statement per batch.
        self._stocks: Coalescer[str, inv.SkuStock] = Coalescer(
            lambda skus: rt.read_one_statement(lambda conn: inv.fetch_sku_stocks(conn, skus))
        )
        self.batcher: inv.ReserveBatcher | None = None
        if s.reserve_batching:
            self.batcher = inv.ReserveBatcher(
                rt.sessions,
                encode=_encode,
                window=s.reserve_batch_window_ms / 1000,
                max_inflight=s.reserve_batch_inflight,
                on_batch=metrics.RESERVE_BATCH_SIZE.observe,
            )

    @staticmethod
    def _actor() -> str:
        return current_caller().subject

    # ------------------------------------------------------------ warehouses

    async def CreateWarehouse(self, request: pb.CreateWarehouseRequest, context: Ctx) -> pb.Warehouse:
        w = request.warehouse

        async def run(uow: UnitOfWork) -> pb.Warehouse:
            created = await inv.create_warehouse(
                uow.session,
                code=w.code,
                name=w.name,
                address=address_to_dict(w.address),
                contact=contact_to_dict(w.contact),
                priority=w.priority,
                location=geo_point_from_proto(w, "location"),
            )
            return warehouse_to_proto(created)

        return await self.rt.mutate(request, run)

    async def GetWarehouse(self, request: pb.GetWarehouseRequest, context: Ctx) -> pb.Warehouse:
        return warehouse_to_proto(await self.rt.read(lambda s: inv.get_warehouse(s, request.code)))

    async def UpdateWarehouse(self, request: pb.UpdateWarehouseRequest, context: Ctx) -> pb.Warehouse:
        w = request.warehouse

        async def run(uow: UnitOfWork) -> pb.Warehouse:
            updated = await inv.update_warehouse(
                uow.session,
                code=w.code,
                fields=mask_paths(request.update_mask, "warehouse"),
                name=w.name,
                address=address_to_dict(w.address),
                contact=contact_to_dict(w.contact),
                priority=w.priority,
                active=w.active,
                location=geo_point_from_proto(w, "location"),
            )
            return warehouse_to_proto(updated)

        return await self.rt.mutate(request, run)

    async def DeactivateWarehouse(self, request: pb.DeactivateWarehouseRequest, context: Ctx) -> pb.Warehouse:
        async def run(uow: UnitOfWork) -> pb.Warehouse:
            return warehouse_to_proto(await inv.deactivate_warehouse(uow.session, request.code))

        return await self.rt.mutate(request, run)

    async def ListWarehouses(
        self, request: pb.ListWarehousesRequest, context: Ctx
    ) -> pb.ListWarehousesResponse:
        found, token = await self.rt.read(
            lambda s: inv.list_warehouses(
                s, size=request.page_size, token=request.page_token, include_inactive=request.include_inactive
            )
        )
        return pb.ListWarehousesResponse(
            warehouses=[warehouse_to_proto(w) for w in found], next_page_token=token
        )

    # ------------------------------------------------------------ items

    async def UpsertInventoryItem(
        self, request: pb.UpsertInventoryItemRequest, context: Ctx
    ) -> pb.InventoryItem:
        i = request.item

        async def run(uow: UnitOfWork) -> pb.InventoryItem:
            item = await inv.upsert_item(
                uow.session,
                sku=i.sku,
                track_inventory=i.track_inventory if i.HasField("track_inventory") else True,
                allow_backorder=i.allow_backorder,
                max_backorder=i.max_backorder_quantity,
                low_stock_threshold=i.low_stock_threshold,
            )
            return item_to_proto(item)

        return await self.rt.mutate(request, run)

    async def SetKitComponents(self, request: pb.SetKitComponentsRequest, context: Ctx) -> pb.InventoryItem:
        components = kit_components(list(request.components))

        async def run(uow: UnitOfWork) -> pb.InventoryItem:
            item = await inv.set_kit_components(uow.session, sku=request.sku, components=components)
            return item_to_proto(item)

        return await self.rt.mutate(request, run)

    async def GetInventoryItem(self, request: pb.GetInventoryItemRequest, context: Ctx) -> pb.InventoryItem:
        sku = inv.normalize_sku(request.sku) or request.sku
        return item_to_proto(await self.rt.read(lambda s: inv.get_item(s, sku)))

    # ------------------------------------------------------------ levels

    async def GetStockLevel(self, request: pb.GetStockLevelRequest, context: Ctx) -> pb.SkuStock:
        if request.warehouse_code or request.channel:
            st = await self.rt.read(
                lambda s: inv.get_stock_level(s, request.sku, request.warehouse_code, channel=request.channel)
            )
        else:
            st = await inv.stock_of(self._stocks.get, request.sku)
        return sku_stock_to_proto(st)

    async def BatchGetStockLevels(
        self, request: pb.BatchGetStockLevelsRequest, context: Ctx
    ) -> pb.BatchGetStockLevelsResponse:
        stocks, missing = await self.rt.read(
            lambda s: inv.batch_get_stock_levels(s, list(request.skus), channel=request.channel)
        )
        return pb.BatchGetStockLevelsResponse(
            stocks=[sku_stock_to_proto(x) for x in stocks], missing_skus=missing
        )

    async def ListStockLevels(
        self, request: pb.ListStockLevelsRequest, context: Ctx
    ) -> pb.ListStockLevelsResponse:
        levels, token = await self.rt.read(
            lambda s: inv.list_stock_levels(
                s,
                size=request.page_size,
                token=request.page_token,
                warehouse_code=request.warehouse_code,
                sku_prefix=request.sku_prefix,
                below_threshold_only=request.below_threshold_only,
                backordered_only=request.backordered_only,
                channel=request.channel,
            )
        )
        return pb.ListStockLevelsResponse(levels=[level_to_proto(lv) for lv in levels], next_page_token=token)

    # ------------------------------------------------------------ changes

    async def AdjustStock(self, request: pb.AdjustStockRequest, context: Ctx) -> pb.StockChange:
        actor = self._actor()

        async def run(uow: UnitOfWork) -> pb.StockChange:
            change = await inv.adjust_stock(
                uow.session,
                sku=request.sku,
                warehouse_code=request.warehouse_code,
                delta=request.delta,
                reason=request.reason,
                reference=request.reference,
                actor=actor,
            )
            return change_to_proto(change)

        return await self.rt.mutate(request, run)

    async def SetStock(self, request: pb.SetStockRequest, context: Ctx) -> pb.StockChange:
        actor = self._actor()
        expected = request.expected_on_hand if request.HasField("expected_on_hand") else None

        async def run(uow: UnitOfWork) -> pb.StockChange:
            change = await inv.set_stock(
                uow.session,
                sku=request.sku,
                warehouse_code=request.warehouse_code,
                quantity=request.quantity,
                expected_on_hand=expected,
                reason=request.reason,
                reference=request.reference,
                actor=actor,
            )
            return change_to_proto(change)

        return await self.rt.mutate(request, run)

    async def BulkAdjustStock(
        self, request: pb.BulkAdjustStockRequest, context: Ctx
    ) -> pb.BulkAdjustStockResponse:
        actor = self._actor()
        lines = [inv.Adjustment(a.sku, a.warehouse_code, a.delta, a.reason) for a in request.adjustments]

        async def run(uow: UnitOfWork) -> pb.BulkAdjustStockResponse:
            changes = await inv.bulk_adjust_stock(
                uow.session, lines, reference=request.reference, actor=actor
            )
            return pb.BulkAdjustStockResponse(changes=[change_to_proto(c) for c in changes])

        return await self.rt.mutate(request, run)

    async def ReceiveStock(self, request: pb.ReceiveStockRequest, context: Ctx) -> pb.StockChange:
        actor = self._actor()
        cost = (
            inv.Cost(request.unit_cost.amount_minor, request.unit_cost.currency_code)
            if request.HasField("unit_cost")
            else None
        )

        async def run(uow: UnitOfWork) -> pb.StockChange:
            change = await inv.receive_stock(
                uow.session,
                sku=request.sku,
                warehouse_code=request.warehouse_code,
                quantity=request.quantity,
                unit_cost=cost,
                lot_code=request.lot_code,
                reason=request.reason,
                reference=request.reference,
                actor=actor,
            )
            return change_to_proto(change)

        return await self.rt.mutate(request, run)

    async def ReturnStock(self, request: pb.ReturnStockRequest, context: Ctx) -> pb.StockChange:
        actor = self._actor()

        async def run(uow: UnitOfWork) -> pb.StockChange:
            change = await inv.return_stock(
                uow.session,
                sku=request.sku,
                warehouse_code=request.warehouse_code,
                quantity=request.quantity,
                reason=request.reason,
                reference=request.reference,
                actor=actor,
            )
            return change_to_proto(change)

        return await self.rt.mutate(request, run)

    async def ListStockMovements(
        self, request: pb.ListStockMovementsRequest, context: Ctx
    ) -> pb.ListStockMovementsResponse:
        types = movement_types(list(request.types))
        start = from_ts_field(request, "start_time")
        end = from_ts_field(request, "end_time")
        moves, token = await self.rt.read(
            lambda s: inv.list_movements(
                s,
                size=request.page_size,
                token=request.page_token,
                sku=request.sku,
                warehouse_code=request.warehouse_code,
                types=types,
                reference=request.reference,
                start=start,
                end=end,
            )
        )
        return pb.ListStockMovementsResponse(
            movements=[movement_to_proto(m) for m in moves], next_page_token=token
        )

    # ------------------------------------------------------------ reservations

    async def ReserveStock(self, request: pb.ReserveStockRequest, context: Ctx) -> pb.Reservation:
        actor = self._actor()
        req = inv.reserve_request(
            [inv.LineRequest(x.sku, x.quantity, x.warehouse_code) for x in request.lines],
            reference=request.reference,
            ttl=from_duration(request.ttl),
            actor=actor,
            channel=channel.slug if (channel := bound_channel()) is not None else "",
            destination=geo_point_from_proto(request, "destination"),
        )
        if self.batcher is None:

            async def run(uow: UnitOfWork) -> pb.Reservation:
                (result,) = await inv.reserve_many(uow.session, [req])
                if isinstance(result, DomainError):
                    raise result
                return reservation_to_proto(result)

            return await self.rt.mutate(request, run)
        claim = None
        digest = b""
        method = current_method()
        if request.request_id:
            # The digest rt.mutate uses, so replays and conflicts behave the same.
            digest = request_digest(method, request)
            claim = idempotency.Claim(actor, request.request_id, method, digest)
        outcome = await self.batcher.submit_encoded(req, claim)
        if isinstance(outcome, idempotency.StoredResponse):
            replayed: pb.Reservation = self.rt.replay(outcome, method, digest)
            return replayed
        if outcome.response is not None:
            # The bytes stored for this request_id (built once, by _encode): parsing them
            # back costs a fraction of building the message again.
            return pb.Reservation.FromString(outcome.response)
        return reservation_to_proto(outcome.reservation)

    # ------------------------------------------------------------ allocation per channel

    async def SetChannelAllocation(
        self, request: pb.SetChannelAllocationRequest, context: Ctx
    ) -> pb.ChannelAllocation:
        a = request.allocation
        strategy = strategy_from_proto(a.strategy)

        async def run(uow: UnitOfWork) -> pb.ChannelAllocation:
            done = await inv.set_channel_allocation(
                uow.session, channel=a.channel, warehouse_codes=list(a.warehouse_codes), strategy=strategy
            )
            return channel_allocation_to_proto(done)

        return await self.rt.mutate(request, run)

    async def GetChannelAllocation(
        self, request: pb.GetChannelAllocationRequest, context: Ctx
    ) -> pb.ChannelAllocation:
        found = await self.rt.read(lambda s: inv.get_channel_allocation(s, request.channel))
        return channel_allocation_to_proto(found)

    async def GetReservation(self, request: pb.GetReservationRequest, context: Ctx) -> pb.Reservation:
        return reservation_to_proto(await self.rt.read(lambda s: inv.get_reservation(s, request.id)))

    async def ListReservations(
        self, request: pb.ListReservationsRequest, context: Ctx
    ) -> pb.ListReservationsResponse:
        state = STATE_FROM_PROTO.get(request.state, "") if request.state else ""
        if request.state and not state:
            raise InvalidArgument("INVALID_ARGUMENT", "state is not a reservation state")
        found, token = await self.rt.read(
            lambda s: inv.list_reservations(
                s, reference=request.reference, state=state, size=request.page_size, token=request.page_token
            )
        )
        return pb.ListReservationsResponse(
            reservations=[reservation_to_proto(r) for r in found], next_page_token=token
        )

    async def ExtendReservation(self, request: pb.ExtendReservationRequest, context: Ctx) -> pb.Reservation:
        actor = self._actor()
        ttl = from_duration(request.ttl)
        if ttl is None:
            raise InvalidArgument("INVALID_ARGUMENT", "ttl is required")

        async def run(uow: UnitOfWork) -> pb.Reservation:
            return reservation_to_proto(await inv.extend(uow.session, request.id, ttl, actor=actor))

        return await self.rt.mutate(request, run)

    async def ReleaseReservation(self, request: pb.ReleaseReservationRequest, context: Ctx) -> pb.Reservation:
        actor = self._actor()

        async def run(uow: UnitOfWork) -> pb.Reservation:
            res = await inv.release(
                uow.session, request.id, quantities(list(request.lines)), reason=request.reason, actor=actor
            )
            return reservation_to_proto(res)

        return await self.rt.mutate(request, run)

    async def FulfillReservation(
        self, request: pb.FulfillReservationRequest, context: Ctx
    ) -> pb.FulfillReservationResponse:
        actor = self._actor()

        async def run(uow: UnitOfWork) -> pb.FulfillReservationResponse:
            done = await inv.fulfil(
                uow.session,
                request.id,
                quantities(list(request.lines)),
                reference=request.reference,
                actor=actor,
            )
            return pb.FulfillReservationResponse(
                reservation=reservation_to_proto(done.reservation),
                movements=[movement_to_proto(m) for m in done.movements],
                kit_costs=[
                    pb.KitCost(kit_sku=k.kit_sku, quantity=k.quantity, cost=money(k.cost))
                    for k in done.kit_costs
                ],
            )

        return await self.rt.mutate(request, run)

    # ------------------------------------------------------------ audit and repair

    async def AuditStock(self, request: pb.AuditStockRequest, context: Ctx) -> pb.AuditStockResponse:
        kinds = drift_kinds(list(request.kinds))
        page = await self.rt.read(
            lambda s: inv.audit_stock(
                s,
                size=request.page_size,
                token=request.page_token,
                skus=list(request.skus),
                warehouse_codes=list(request.warehouse_codes),
                kinds=kinds,
                whole_ledger=request.whole_ledger,
            )
        )
        return pb.AuditStockResponse(
            drifts=[drift_to_proto(d) for d in page.drifts],
            next_page_token=page.next_token,
            levels_checked=page.levels_checked,
        )

    async def RepairStock(self, request: pb.RepairStockRequest, context: Ctx) -> pb.RepairStockResponse:
        actor = self._actor()

        async def run(uow: UnitOfWork) -> pb.RepairStockResponse:
            done = await inv.repair_stock(
                uow.session,
                sku=request.sku,
                warehouse_code=request.warehouse_code,
                kind=drift_kind(request.kind),
                expected_counter=request.expected_counter,
                expected_derived=request.expected_derived,
                reason=request.reason,
                actor=actor,
            )
            return repair_to_proto(done)

        return await self.rt.mutate(request, run)
