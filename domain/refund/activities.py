"""Activities of RefundExecutionWorkflow. Each is idempotent: see execution.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from domain.refund import execution
from domain.refund.gateway import GatewayError, GatewayRefund, PaymentGateway
from domain.refund.workflows import (
    FINISH,
    LOAD_PLAN,
    RECORD_FAULT,
    REFUND_TENDER,
    FaultInput,
    PlanOut,
    RefundExecutionInput,
    TenderStep,
)
from domain.shared.errors import DomainError
from domain.shared.uow import UnitOfWork

T = TypeVar("T")
HEARTBEAT_EVERY = 1.0


class RefundActivities:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], gateway: PaymentGateway) -> None:
        self.sessions = sessions
        self.gateway = gateway

    def all(self) -> Sequence[Callable[..., Any]]:
        return [self.load_plan, self.refund_tender, self.finish, self.record_fault]

    async def _tx(self, fn: Callable[[AsyncSession], Awaitable[T]]) -> T:
        try:
            async with UnitOfWork(self.sessions) as uow:
                result = await fn(uow.session)
                await uow.commit()
                return result
        except DomainError as err:
            # A refusal by our own rules will not change on retry: fault the refund.
            raise ApplicationError(err.message, type=err.reason, non_retryable=True) from err

    @activity.defn(name=LOAD_PLAN)
    async def load_plan(self, inp: RefundExecutionInput) -> PlanOut:
        plan = await self._tx(lambda s: execution.execution_plan(s, inp.refund_id))
        return PlanOut(plan.state, plan.attempt, [t.tender_id for t in plan.tenders])

    @activity.defn(name=REFUND_TENDER)
    async def refund_tender(self, step: TenderStep) -> str:
        # Heartbeats cover the whole step (database and gateway), so only a dead
        # worker, not a slow database, trips the heartbeat timeout.
        return await _heartbeating(self._refund_tender(step))

    async def _refund_tender(self, step: TenderStep) -> str:
        begun = await self._tx(lambda s: execution.begin_tender_attempt(s, step.refund_id, step.tender_id))
        if begun is None:
            return "already_refunded"
        refund, tender = begun
        request = GatewayRefund(
            idempotency_key=tender.idempotency_key,
            tender_id=tender.tender_id,
            method=tender.method,
            gateway_reference=tender.gateway_reference,
            currency=refund.currency,
            amount_minor=tender.amount_minor,
        )
        try:
            result = await self.gateway.refund(request)
        except GatewayError as err:
            raise ApplicationError(err.message, type=err.error_type, non_retryable=not err.retryable) from err
        await self._tx(
            lambda s: execution.mark_tender_refunded(
                s, step.refund_id, step.tender_id, result.gateway_refund_id
            )
        )
        return result.gateway_refund_id

    @activity.defn(name=FINISH)
    async def finish(self, inp: RefundExecutionInput) -> str:
        refund = await self._tx(lambda s: execution.finish_refund(s, inp.refund_id))
        return refund.state

    @activity.defn(name=RECORD_FAULT)
    async def record_fault(self, inp: FaultInput) -> bool:
        return await self._tx(
            lambda s: execution.record_fault(
                s, inp.refund_id, inp.attempt, step=inp.step, error_type=inp.error_type, message=inp.message
            )
        )


async def _heartbeating(call: Awaitable[T]) -> T:
    """Awaits `call` while heartbeating, so Temporal notices a dead worker quickly."""
    task = asyncio.ensure_future(call)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_EVERY)
            if done:
                return task.result()
            activity.heartbeat()
    finally:
        if not task.done():
            task.cancel()
