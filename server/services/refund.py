"""RefundService servicer: decode, call one domain function, encode.

Decisions and retries start the execution workflow after their transaction
commits (a crash in between is covered by the reconciler job in server/background.py).
"""

from __future__ import annotations

import logging

import grpc

import domain.refund as refunds
from domain.shared.errors import FieldViolation, InvalidArgument
from domain.shared.uow import UnitOfWork
from entrepot.platform.v1 import types_pb2
from entrepot.refund.v1 import refund_pb2, refund_pb2_grpc
from server.context import current_caller, current_channel
from server.convert import from_money, ts
from server.runtime import Runtime

log = logging.getLogger("entrepot.refund")

_STATE = {
    refunds.PENDING_APPROVAL: refund_pb2.Refund.STATE_PENDING_APPROVAL,
    refunds.DENIED: refund_pb2.Refund.STATE_DENIED,
    refunds.EXECUTING: refund_pb2.Refund.STATE_EXECUTING,
    refunds.COMPLETED: refund_pb2.Refund.STATE_COMPLETED,
    refunds.FAULTED: refund_pb2.Refund.STATE_FAULTED,
}
_STATE_NAME = {v: k for k, v in _STATE.items()}
_TENDER_STATE = {
    "pending": refund_pb2.RefundTender.STATE_PENDING,
    "succeeded": refund_pb2.RefundTender.STATE_SUCCEEDED,
}


def _money(currency: str, amount: int) -> types_pb2.Money:
    return types_pb2.Money(currency_code=currency, amount_minor=amount)


def refund_to_proto(r: refunds.Refund) -> refund_pb2.Refund:
    return refund_pb2.Refund(
        refund_id=r.id,
        order_id=r.order_id,
        channel=r.channel,
        state=_STATE[r.state],
        lines=[
            refund_pb2.RefundLine(
                line_id=li.line_id,
                sku=li.sku,
                quantity=li.quantity,
                amount=_money(r.currency, li.amount_minor),
            )
            for li in r.lines
        ],
        amount=_money(r.currency, r.amount_minor),
        reason=r.reason,
        restock=r.restock,
        restock_warehouse_code=r.restock_warehouse_code,
        tenders=[
            refund_pb2.RefundTender(
                tender_id=t.tender_id,
                method=t.method,
                amount=_money(r.currency, t.amount_minor),
                state=_TENDER_STATE[t.state],
                idempotency_key=t.idempotency_key,
                gateway_refund_id=t.gateway_refund_id,
                attempts=t.attempts,
                refund_time=ts(t.refunded_at),
            )
            for t in r.tenders
        ],
        requested_by=r.requested_by,
        decided_by=r.decided_by,
        decision_note=r.decision_note,
        execution_attempt=r.execution_attempt,
        workflow_id=r.workflow_id,
        fault_message=r.fault_message,
        create_time=ts(r.created_at),
        decide_time=ts(r.decided_at),
        complete_time=ts(r.completed_at),
    )


def fault_to_proto(f: refunds.WorkflowFault) -> refund_pb2.WorkflowFault:
    return refund_pb2.WorkflowFault(
        fault_id=f.id,
        workflow_id=f.workflow_id,
        subject_type=f.subject_type,
        subject_id=f.subject_id,
        step=f.step,
        error_type=f.error_type,
        message=f.message,
        create_time=ts(f.created_at),
        resolve_time=ts(f.resolved_at),
    )


class RefundServicer(refund_pb2_grpc.RefundServiceServicer):
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def _ensure_started(self, response: refund_pb2.Refund) -> None:
        """After commit (also on an idempotent replay): make sure the execution runs."""
        if response.state != refund_pb2.Refund.STATE_EXECUTING:
            return
        # The stored response may be older than the refund; act on the current state.
        current = await self.rt.read(lambda s: refunds.get_refund(s, response.refund_id, channel=None))
        if current.state != refunds.EXECUTING:
            return
        queue, attempt = self.rt.settings.temporal_task_queue, current.execution_attempt
        await self.rt.start_after_commit(
            lambda client: refunds.start_execution(client, queue, current.id, attempt), refund_id=current.id
        )

    async def SubmitRefundForApproval(
        self, request: refund_pb2.SubmitRefundForApprovalRequest, context: grpc.aio.ServicerContext
    ) -> refund_pb2.Refund:
        channel = current_channel()

        async def run(uow: UnitOfWork) -> refund_pb2.Refund:
            refund = await refunds.submit_refund(
                uow.session,
                channel=channel,
                order_id=request.order_id,
                lines=[refunds.LineInput(li.line_id, li.quantity) for li in request.lines],
                amount=from_money(request.amount) if request.HasField("amount") else None,
                reason=request.reason,
                restock=request.restock,
                restock_warehouse_code=request.restock_warehouse_code,
                caller=current_caller(),
            )
            return refund_to_proto(refund)

        return await self.rt.mutate(request, run)

    async def DecideRefundApproval(
        self, request: refund_pb2.DecideRefundApprovalRequest, context: grpc.aio.ServicerContext
    ) -> refund_pb2.Refund:
        channel = current_channel()
        D = refund_pb2.DecideRefundApprovalRequest
        if request.decision not in (D.DECISION_APPROVE, D.DECISION_DENY):
            raise refunds_invalid_decision()

        async def run(uow: UnitOfWork) -> refund_pb2.Refund:
            refund = await refunds.decide_refund(
                uow.session,
                request.refund_id,
                channel=channel.slug,
                approve=request.decision == D.DECISION_APPROVE,
                note=request.note,
                caller=current_caller(),
            )
            return refund_to_proto(refund)

        response = await self.rt.mutate(request, run)
        await self._ensure_started(response)
        return response

    async def RetryRefundExecution(
        self, request: refund_pb2.RetryRefundExecutionRequest, context: grpc.aio.ServicerContext
    ) -> refund_pb2.Refund:
        channel = current_channel()

        async def run(uow: UnitOfWork) -> refund_pb2.Refund:
            refund = await refunds.retry_refund(
                uow.session, request.refund_id, channel=channel.slug, caller=current_caller()
            )
            return refund_to_proto(refund)

        response = await self.rt.mutate(request, run)
        await self._ensure_started(response)
        return response

    async def GetRefund(
        self, request: refund_pb2.GetRefundRequest, context: grpc.aio.ServicerContext
    ) -> refund_pb2.Refund:
        slug = current_channel().slug
        return refund_to_proto(
            await self.rt.read(lambda s: refunds.get_refund(s, request.refund_id, channel=slug))
        )

    async def ListRefundRequests(
        self, request: refund_pb2.ListRefundRequestsRequest, context: grpc.aio.ServicerContext
    ) -> refund_pb2.ListRefundRequestsResponse:
        slug = current_channel().slug
        states = [_STATE_NAME.get(s, f"unknown:{s}") for s in request.states]
        found, token = await self.rt.read(
            lambda s: refunds.list_refunds(
                s,
                channel=slug,
                states=states,
                order_id=request.order_id,
                size=request.page_size,
                token=request.page_token,
            )
        )
        return refund_pb2.ListRefundRequestsResponse(
            refunds=[refund_to_proto(r) for r in found], next_page_token=token
        )

    async def ListWorkflowFaults(
        self, request: refund_pb2.ListWorkflowFaultsRequest, context: grpc.aio.ServicerContext
    ) -> refund_pb2.ListWorkflowFaultsResponse:
        slug = current_channel().slug
        found, token = await self.rt.read(
            lambda s: refunds.list_faults(
                s,
                channel=slug,
                refund_id=request.refund_id,
                include_resolved=request.include_resolved,
                size=request.page_size,
                token=request.page_token,
            )
        )
        return refund_pb2.ListWorkflowFaultsResponse(
            faults=[fault_to_proto(f) for f in found], next_page_token=token
        )


def refunds_invalid_decision() -> InvalidArgument:
    return InvalidArgument(
        "INVALID_DECISION",
        "decision must be APPROVE or DENY",
        field_violations=[FieldViolation("decision", "must be DECISION_APPROVE or DECISION_DENY")],
    )
