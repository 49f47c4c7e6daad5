"""CartService servicer: thin; decode, call one domain function, encode."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message

import domain.cart as carts
from domain.platform.idempotency import Claim
from domain.shared.errors import InvalidArgument, Violations
from domain.shared.money import Money
from domain.shared.uow import UnitOfWork
from entrepot.cart.v1 import cart_pb2 as pb
from entrepot.cart.v1 import cart_pb2_grpc
from entrepot.platform.v1 import types_pb2
from server import metrics
from server.context import current_caller, current_channel
from server.convert import from_duration, from_money, mask_paths, money, ts
from server.runtime import Runtime

M = TypeVar("M", bound=Message)

# Where refunded quantities come from: per-customer purchase limits credit back
# units of completed refunds (domain.refund.refunded_quantity).
REFUNDS: carts.RefundedQuantities = carts.RefundModuleQuantities()

_STATE_TO_PB = {
    carts.CartState.ACTIVE: pb.Cart.STATE_ACTIVE,
    carts.CartState.PENDING_APPROVAL: pb.Cart.STATE_PENDING_APPROVAL,
    carts.CartState.APPROVED: pb.Cart.STATE_APPROVED,
    carts.CartState.APPROVED_BLOCKED_INVENTORY: pb.Cart.STATE_APPROVED_BLOCKED_INVENTORY,
    carts.CartState.REJECTED: pb.Cart.STATE_REJECTED,
    carts.CartState.CONVERTED: pb.Cart.STATE_CONVERTED,
}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}
_HOLD_TO_PB = {
    "none": pb.StockHold.STATE_NONE,
    "held": pb.StockHold.STATE_HELD,
    "expired": pb.StockHold.STATE_EXPIRED,
    "released": pb.StockHold.STATE_RELEASED,
}
_DECISION_TO_PB = {
    "": pb.Approval.DECISION_UNSPECIFIED,
    "approve": pb.Approval.DECISION_APPROVE,
    "reject": pb.Approval.DECISION_REJECT,
}


def _duration(value: timedelta | None) -> duration_pb2.Duration | None:
    if value is None:
        return None
    out = duration_pb2.Duration()
    out.FromTimedelta(value)
    return out


def cart_to_proto(c: carts.Cart) -> pb.Cart:
    out = pb.Cart(
        id=c.id,
        channel=c.channel,
        customer_ref=c.customer_ref,
        version=c.version,
        state=_STATE_TO_PB[c.state],
        lines=[
            pb.CartLine(
                line_id=x.line_id,
                sku=x.sku,
                quantity=x.quantity,
                unit_price=money(x.unit_price),
                line_total=money(x.line_total),
            )
            for x in c.lines
        ],
        subtotal=money(c.subtotal),
        item_count=c.item_count,
        approval_required=c.approval_required,
        hold=pb.StockHold(
            state=_HOLD_TO_PB[c.hold.state],
            reservation_id=c.hold.reservation_id,
            expire_time=ts(c.hold.expires_at),
            ttl=_duration(c.hold.ttl),
        ),
        order_id=c.order_id,
        created_by=c.created_by,
        create_time=ts(c.created_at),
        update_time=ts(c.updated_at),
    )
    a = c.approval
    if a is not None:
        out.approval.CopyFrom(
            pb.Approval(
                submitted_by=a.submitted_by,
                submit_time=ts(a.submitted_at),
                submit_note=a.note,
                decision=_DECISION_TO_PB[a.decision],
                decided_by=a.decided_by,
                decide_time=ts(a.decided_at),
                reason=a.reason,
                shortages=[pb.StockShortage(sku=s.sku, description=s.description) for s in a.shortages],
                approved_grand_total=money(a.approved_grand_total),
                approved_lines=[
                    pb.ApprovedLine(
                        line_id=x.line_id,
                        sku=x.sku,
                        quantity=x.quantity,
                        unit_price=money(Money(c.currency, x.unit_price_minor)),
                    )
                    for x in a.approved_lines
                ],
                stale=a.stale,
            )
        )
    return out


def limit_to_proto(limit: carts.Limit, channel: str) -> pb.PurchaseLimit:
    return pb.PurchaseLimit(
        sku=limit.sku,
        channel=channel,
        min_quantity=limit.min_quantity,
        order_multiple=limit.order_multiple,
        max_per_order=limit.max_per_order,
        max_per_customer=limit.max_per_customer,
        update_time=ts(limit.updated_at),
    )


def _opt_money(m: types_pb2.Money, present: bool) -> Money | None:
    return from_money(m) if present else None


def _draft(line: pb.CartLine) -> carts.LineDraft:
    return carts.LineDraft(line.sku, line.quantity, from_money(line.unit_price))


class CartServicer(cart_pb2_grpc.CartServiceServicer):
    def __init__(self, rt: Runtime, refunds: carts.RefundedQuantities | None = None) -> None:
        self.rt = rt
        self.refunds = refunds if refunds is not None else REFUNDS

    async def _cart_mutation(
        self, request: Message, fn: Callable[[UnitOfWork], Awaitable[carts.Cart]]
    ) -> pb.Cart:
        async def run(uow: UnitOfWork) -> pb.Cart:
            return cart_to_proto(await fn(uow))

        return await self.rt.mutate(request, run)

    async def CreateCart(self, request: pb.CreateCartRequest, context: grpc.aio.ServicerContext) -> pb.Cart:
        caller, channel = current_caller(), current_channel()
        c = request.cart
        return await self._cart_mutation(
            request,
            lambda uow: carts.create_cart(
                uow.session,
                channel=channel,
                customer_ref=c.customer_ref,
                approval_required=c.approval_required,
                lines=[_draft(x) for x in c.lines],
                actor=caller.subject,
                refunds=self.refunds,
            ),
        )

    async def GetCart(self, request: pb.GetCartRequest, context: grpc.aio.ServicerContext) -> pb.Cart:
        channel = current_channel()
        return cart_to_proto(
            await self.rt.read(lambda s: carts.get_cart(s, request.cart_id, channel=channel))
        )

    async def ListCarts(
        self, request: pb.ListCartsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCartsResponse:
        channel = current_channel()
        state = _STATE_FROM_PB.get(request.state)
        if state is None and request.state != pb.Cart.STATE_UNSPECIFIED:
            v = Violations()
            v.add("state", f"unknown state {request.state}")
            raise InvalidArgument("INVALID_ARGUMENT", "the filter is invalid", field_violations=v.items)
        found, token = await self.rt.read(
            lambda s: carts.list_carts(
                s,
                channel=channel,
                customer_ref=request.customer_ref,
                state=state,
                size=request.page_size,
                token=request.page_token,
            )
        )
        return pb.ListCartsResponse(carts=[cart_to_proto(c) for c in found], next_page_token=token)

    async def AddCartLine(self, request: pb.AddCartLineRequest, context: grpc.aio.ServicerContext) -> pb.Cart:
        caller, channel = current_caller(), current_channel()
        return await self._cart_mutation(
            request,
            lambda uow: carts.add_line(
                uow.session,
                request.cart_id,
                request.version,
                channel=channel,
                line=_draft(request.line),
                actor=caller.subject,
                refunds=self.refunds,
            ),
        )

    async def UpdateCartLine(
        self, request: pb.UpdateCartLineRequest, context: grpc.aio.ServicerContext
    ) -> pb.Cart:
        caller, channel = current_caller(), current_channel()
        return await self._cart_mutation(
            request,
            lambda uow: carts.update_line(
                uow.session,
                request.cart_id,
                request.version,
                channel=channel,
                line_id=request.line.line_id,
                fields=mask_paths(request.update_mask, "line"),
                quantity=request.line.quantity,
                unit_price=from_money(request.line.unit_price),
                actor=caller.subject,
                refunds=self.refunds,
            ),
        )

    async def RemoveCartLine(
        self, request: pb.RemoveCartLineRequest, context: grpc.aio.ServicerContext
    ) -> pb.Cart:
        caller, channel = current_caller(), current_channel()
        return await self._cart_mutation(
            request,
            lambda uow: carts.remove_line(
                uow.session,
                request.cart_id,
                request.version,
                channel=channel,
                line_id=request.line_id,
                actor=caller.subject,
                refunds=self.refunds,
            ),
        )

    async def HoldCartStock(
        self, request: pb.HoldCartStockRequest, context: grpc.aio.ServicerContext
    ) -> pb.Cart:
        caller, channel = current_caller(), current_channel()
        ttl = from_duration(request.ttl) if request.HasField("ttl") else None
        return await self._cart_mutation(
            request,
            lambda uow: carts.hold_stock(
                uow.session, request.cart_id, request.version, channel=channel, ttl=ttl, actor=caller.subject
            ),
        )

    async def ReleaseCartHold(
        self, request: pb.ReleaseCartHoldRequest, context: grpc.aio.ServicerContext
    ) -> pb.Cart:
        caller, channel = current_caller(), current_channel()
        return await self._cart_mutation(
            request,
            lambda uow: carts.release_hold(
                uow.session, request.cart_id, request.version, channel=channel, actor=caller.subject
            ),
        )

    async def SetPurchaseLimit(
        self, request: pb.SetPurchaseLimitRequest, context: grpc.aio.ServicerContext
    ) -> pb.PurchaseLimit:
        caller, channel = current_caller(), current_channel()
        lim = request.limit

        async def run(uow: UnitOfWork) -> pb.PurchaseLimit:
            saved = await carts.set_purchase_limit(
                uow.session,
                channel=channel,
                limit=carts.Limit(
                    lim.sku, lim.min_quantity, lim.order_multiple, lim.max_per_order, lim.max_per_customer
                ),
                actor=caller.subject,
            )
            return limit_to_proto(saved, channel.slug)

        return await self.rt.mutate(request, run)

    async def GetPurchaseLimit(
        self, request: pb.GetPurchaseLimitRequest, context: grpc.aio.ServicerContext
    ) -> pb.PurchaseLimit:
        channel = current_channel()
        found = await self.rt.read(lambda s: carts.get_purchase_limit(s, channel=channel, sku=request.sku))
        return limit_to_proto(found, channel.slug)

    async def SubmitCartForApproval(
        self, request: pb.SubmitCartForApprovalRequest, context: grpc.aio.ServicerContext
    ) -> pb.Cart:
        caller, channel = current_caller(), current_channel()
        return await self._cart_mutation(
            request,
            lambda uow: carts.submit_for_approval(
                uow.session,
                request.cart_id,
                request.version,
                channel=channel,
                note=request.note,
                actor=caller.subject,
            ),
        )

    async def DecideCartApproval(
        self, request: pb.DecideCartApprovalRequest, context: grpc.aio.ServicerContext
    ) -> pb.Cart:
        caller, channel = current_caller(), current_channel()
        if request.decision not in (pb.Approval.DECISION_APPROVE, pb.Approval.DECISION_REJECT):
            v = Violations()
            v.add("decision", "must be DECISION_APPROVE or DECISION_REJECT")
            raise InvalidArgument("INVALID_ARGUMENT", "the decision is invalid", field_violations=v.items)
        approve = request.decision == pb.Approval.DECISION_APPROVE
        return await self._cart_mutation(
            request,
            lambda uow: carts.decide_approval(
                uow.session,
                request.cart_id,
                request.version,
                channel=channel,
                approve=approve,
                reason=request.reason,
                actor=caller.subject,
            ),
        )

    async def CheckoutCart(
        self, request: pb.CheckoutCartRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckoutCartResponse:
        caller, channel = current_caller(), current_channel()
        payments = [
            carts.Payment(p.tender_id, p.method, from_money(p.captured), p.gateway_reference)
            for p in request.payments
        ]

        decided = metrics.IntentOutcome(carts.SOURCE_SYSTEM)

        def encode(r: carts.CheckoutResult) -> pb.CheckoutCartResponse:
            return pb.CheckoutCartResponse(
                cart=cart_to_proto(r.cart), order_id=r.order_id, reservation_id=r.reservation_id
            )

        async def run(uow: UnitOfWork, claim: Claim | None) -> pb.CheckoutCartResponse:
            decided.outcome = ""
            # The response the conversion stored as the claim's answer, returned as it is.
            answered: list[pb.CheckoutCartResponse] = []

            def respond(r: carts.CheckoutResult) -> bytes:
                answered.append(encode(r))
                return answered[-1].SerializeToString()

            r = await carts.checkout(
                uow.session,
                request.cart_id,
                request.version,
                channel=channel,
                tax=_opt_money(request.tax, request.HasField("tax")),
                shipping=_opt_money(request.shipping, request.HasField("shipping")),
                discount=_opt_money(request.discount, request.HasField("discount")),
                payments=payments,
                external_order_id=request.external_order_id,
                actor=caller.subject,
                refunds=self.refunds,
                claim=claim,
                respond=respond,
            )
            decided.outcome = "created"
            return answered[-1] if answered else encode(r)

        # The checkout's first statement makes the idempotency claim, its last one
        # stores the answer (two round trips less).
        response = await self.rt.mutate_claiming(request, run)
        decided.count()
        return response
