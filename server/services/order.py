"""OrderService servicer: thin; decode, call one domain function, encode."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

import domain.order as orders
from domain.order import watch
from domain.platform.idempotency import Claim
from domain.shared.errors import AlreadyExists, FieldViolation, InvalidArgument
from domain.shared.uow import UnitOfWork
from entrepot.order.v1 import order_pb2 as pb
from entrepot.order.v1 import order_pb2_grpc
from server import metrics
from server.context import current_caller, current_channel
from server.convert import from_duration, from_ts_field
from server.runtime import Runtime
from server.services.order_convert import (
    EVENT_TOPICS,
    STATE_FROM_PB,
    entry_pb,
    event_pb,
    intent_from_pb,
    order_pb,
    shipment_pb,
    shipment_status_pb,
    status_in,
    summary_pb,
)
from server.watch_hub import watch_orders


class OrderServicer(order_pb2_grpc.OrderServiceServicer):
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def SubmitOrderIntent(
        self, request: pb.SubmitOrderIntentRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitOrderIntentResponse:
        caller, channel = current_caller(), current_channel()
        intent = intent_from_pb(request.intent)

        decided = metrics.IntentOutcome(intent.source_system)

        def encode(r: orders.SubmitResult) -> pb.SubmitOrderIntentResponse:
            return pb.SubmitOrderIntentResponse(order=order_pb(r.order), created=r.created)

        async def run(uow: UnitOfWork, claim: Claim | None) -> pb.SubmitOrderIntentResponse:
            decided.outcome = ""
            # The response the reservation's write stored as the claim's answer, returned as it is.
            answered: list[pb.SubmitOrderIntentResponse] = []

            def respond(r: orders.SubmitResult) -> bytes:
                answered.append(encode(r))
                return answered[-1].SerializeToString()

            try:
                r = await orders.submit_intent(
                    uow.session,
                    intent,
                    channel=channel,
                    actor=caller.subject,
                    reserve_inventory=request.reserve_inventory,
                    claim=claim,
                    respond=respond,
                )
            except AlreadyExists as err:
                if err.reason == "INTENT_CONFLICT":
                    decided.outcome = "conflict"
                raise
            decided.outcome = "created" if r.created else "duplicate"
            return answered[-1] if answered else encode(r)

        try:
            if request.reserve_inventory:
                # The reservation's first statement makes the idempotency claim, its write
                # stores the answer (two round trips less).
                response = await self.rt.mutate_claiming(request, run)
            else:
                response = await self.rt.mutate(request, lambda uow: run(uow, None))
        except AlreadyExists:
            decided.count()  # a conflict is the stored answer of a committed call
            raise
        decided.count()
        return response

    async def GetOrder(self, request: pb.GetOrderRequest, context: grpc.aio.ServicerContext) -> pb.Order:
        slug = current_channel().slug
        o = await self.rt.read(lambda s: orders.get_order(s, request.id, channel=slug))
        return order_pb(o)

    async def GetOrderByExternalId(
        self, request: pb.GetOrderByExternalIdRequest, context: grpc.aio.ServicerContext
    ) -> pb.Order:
        slug = current_channel().slug
        o = await self.rt.read(
            lambda s: orders.get_order_by_external_id(
                s, request.source_system, request.external_order_id, channel=slug
            )
        )
        return order_pb(o)

    async def ListOrders(
        self, request: pb.ListOrdersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListOrdersResponse:
        slug = current_channel().slug
        filters = orders.OrderFilter(
            states=tuple(STATE_FROM_PB[s] for s in request.states if s in STATE_FROM_PB),
            customer_ref=request.customer_ref,
            source_system=request.source_system,
            start=from_ts_field(request, "start_time"),
            end=from_ts_field(request, "end_time"),
            blocked_only=request.blocked_only,
            inventory_risk_only=request.inventory_risk_only,
            handoff_unacknowledged_for=from_duration(
                request.handoff_unacknowledged_for, "handoff_unacknowledged_for"
            ),
        )
        found, token = await self.rt.read(
            lambda s: orders.list_orders(
                s, channel=slug, filters=filters, size=request.page_size, token=request.page_token
            )
        )
        return pb.ListOrdersResponse(orders=[order_pb(o) for o in found], next_page_token=token)

    async def AppendOrderStatus(
        self, request: pb.AppendOrderStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.OrderStatusEntry:
        caller, slug = current_caller(), current_channel().slug

        async def run(uow: UnitOfWork) -> pb.OrderStatusEntry:
            entry = status_in(request.entry)
            e = await orders.append_status(
                uow.session, request.entry.order_id, entry, channel=slug, caller=caller
            )
            return entry_pb(e)

        return await self.rt.mutate(request, run)

    async def CloseOrderStatus(
        self, request: pb.CloseOrderStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.OrderStatusEntry:
        caller, slug = current_caller(), current_channel().slug

        async def run(uow: UnitOfWork) -> pb.OrderStatusEntry:
            e = await orders.close_status(
                uow.session, request.order_id, request.entry_id, request.note, channel=slug, caller=caller
            )
            return entry_pb(e)

        return await self.rt.mutate(request, run)

    async def ListOrderStatusHistory(
        self, request: pb.ListOrderStatusHistoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListOrderStatusHistoryResponse:
        slug = current_channel().slug
        entries, token = await self.rt.read(
            lambda s: orders.list_status_history(
                s,
                request.order_id,
                channel=slug,
                module=request.module,
                size=request.page_size,
                token=request.page_token,
            )
        )
        return pb.ListOrderStatusHistoryResponse(
            entries=[entry_pb(e) for e in entries], next_page_token=token
        )

    async def GetOrderStatusSummary(
        self, request: pb.GetOrderStatusSummaryRequest, context: grpc.aio.ServicerContext
    ) -> pb.OrderStatusSummary:
        slug = current_channel().slug
        return summary_pb(
            await self.rt.read(lambda s: orders.status_summary(s, request.order_id, channel=slug))
        )

    async def TransitionOrder(
        self, request: pb.TransitionOrderRequest, context: grpc.aio.ServicerContext
    ) -> pb.Order:
        caller, slug = current_caller(), current_channel().slug
        target = STATE_FROM_PB.get(request.target_state)
        if target is None:
            raise InvalidArgument(
                "INVALID_TARGET_STATE",
                "target_state is required",
                field_violations=[
                    FieldViolation("target_state", "must be PROCESSING, SHIPPED, DELIVERED or CANCELLED")
                ],
            )

        async def run(uow: UnitOfWork) -> pb.Order:
            o = await orders.transition(
                uow.session,
                request.order_id,
                target,
                channel=slug,
                actor=caller.subject,
                reason=request.reason,
                tracking_number=request.tracking_number,
                carrier=request.carrier,
            )
            return order_pb(o)

        return await self.rt.mutate(request, run)

    async def ShipOrderItems(
        self, request: pb.ShipOrderItemsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ShipOrderItemsResponse:
        caller, slug = current_caller(), current_channel().slug
        lines = [(li.line_id, li.quantity) for li in request.lines]

        async def run(uow: UnitOfWork) -> pb.ShipOrderItemsResponse:
            o, shipment = await orders.ship_items(
                uow.session,
                request.order_id,
                lines,
                channel=slug,
                actor=caller.subject,
                tracking_number=request.tracking_number,
                carrier=request.carrier,
            )
            return pb.ShipOrderItemsResponse(order=order_pb(o), shipment=shipment_pb(shipment))

        return await self.rt.mutate(request, run)

    async def GetShipmentStatus(
        self, request: pb.GetShipmentStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ShipmentStatus:
        slug = current_channel().slug
        return shipment_status_pb(
            await self.rt.read(lambda s: orders.shipment_status(s, request.order_id, channel=slug))
        )

    async def ReissueOrder(
        self, request: pb.ReissueOrderRequest, context: grpc.aio.ServicerContext
    ) -> pb.Order:
        caller, channel = current_caller(), current_channel()
        lines = [(li.line_id, li.quantity) for li in request.lines]

        async def run(uow: UnitOfWork) -> pb.Order:
            o = await orders.reissue_order(
                uow.session,
                request.order_id,
                channel=channel,
                reason=request.reason,
                lines=lines,
                keep_unit_prices=request.keep_unit_prices,
                actor=caller.subject,
            )
            return order_pb(o)

        return await self.rt.mutate(request, run)

    async def AcknowledgeOrderHandoff(
        self, request: pb.AcknowledgeOrderHandoffRequest, context: grpc.aio.ServicerContext
    ) -> pb.Order:
        caller, slug = current_caller(), current_channel().slug

        async def run(uow: UnitOfWork) -> pb.Order:
            o = await orders.acknowledge_handoff(
                uow.session,
                request.order_id,
                request.external_reference,
                request.module,
                channel=slug,
                caller=caller,
            )
            return order_pb(o)

        return await self.rt.mutate(request, run)

    async def WatchOrderEvents(
        self, request: pb.WatchOrderEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchOrderEventsResponse]:
        slug = current_channel().slug
        topics = [EVENT_TOPICS[t] for t in request.types if t in EVENT_TOPICS] or list(orders.TOPICS)
        flt = watch.make_filter(slug, topics, request.order_id)
        async for msg in watch_orders(self.rt, flt, request.after_event_id):
            yield pb.WatchOrderEventsResponse(events=[event_pb(e) for e in msg.events], cursor=msg.cursor)
