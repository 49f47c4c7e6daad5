"""RefundExecutionWorkflow: refund each tender once, then finish; a fault stops it.

Deterministic by construction: the workflow only sequences activities by
name; every decision that reads the database happens in an activity. The
activities are idempotent (see domain/refund/execution.py), so a replayed or
retried step never acts twice, and the gateway call carries the idempotency
key fixed per (refund, tender) at submission.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

WORKFLOW_NAME = "RefundExecutionWorkflow"
LOAD_PLAN = "refund.load_plan"
REFUND_TENDER = "refund.refund_tender"
FINISH = "refund.finish"
RECORD_FAULT = "refund.record_fault"

# Database steps: retried until they succeed, unless a step refuses for good
# (a non-retryable ApplicationError), which becomes a fault.
DB_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))
# Gateway calls: a few attempts, then the refund is FAULTED for a person to retry.
GATEWAY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=5,
)
GATEWAY_TIMEOUT = timedelta(seconds=60)
# The activity heartbeats while it waits for the gateway, so a dead worker is
# noticed in seconds rather than after the whole start-to-close timeout.
GATEWAY_HEARTBEAT = timedelta(seconds=10)
DB_TIMEOUT = timedelta(seconds=30)


@dataclass
class RefundExecutionInput:
    refund_id: str
    attempt: int


@dataclass
class PlanOut:
    state: str
    attempt: int
    tenders: list[str] = field(default_factory=list)


@dataclass
class TenderStep:
    refund_id: str
    tender_id: str


@dataclass
class FaultInput:
    refund_id: str
    attempt: int
    step: str
    error_type: str
    message: str


def _describe(err: ActivityError) -> tuple[str, str]:
    cause = err.cause
    if isinstance(cause, ApplicationError):
        return cause.type or "ApplicationError", cause.message
    if cause is not None:
        return type(cause).__name__, str(cause)
    return "ActivityError", str(err)


@workflow.defn(name=WORKFLOW_NAME)
class RefundExecutionWorkflow:
    @workflow.run
    async def run(self, inp: RefundExecutionInput) -> str:
        plan: PlanOut = await workflow.execute_activity(
            LOAD_PLAN, inp, result_type=PlanOut, start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY
        )
        if plan.state != "executing" or plan.attempt != inp.attempt:
            # Another execution or a decision already moved on; nothing to do.
            return str(plan.state)
        step = "plan"
        try:
            # Tenders in the submitted split order (reverse capture order), one at a time.
            for tender_id in plan.tenders:
                step = f"tender:{tender_id}"
                await workflow.execute_activity(
                    REFUND_TENDER,
                    TenderStep(inp.refund_id, tender_id),
                    start_to_close_timeout=GATEWAY_TIMEOUT,
                    heartbeat_timeout=GATEWAY_HEARTBEAT,
                    retry_policy=GATEWAY_RETRY,
                )
            step = "finish"
            await workflow.execute_activity(
                FINISH, inp, start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY
            )
        except ActivityError as err:
            error_type, message = _describe(err)
            await workflow.execute_activity(
                RECORD_FAULT,
                FaultInput(inp.refund_id, inp.attempt, step, error_type, message),
                start_to_close_timeout=DB_TIMEOUT,
                retry_policy=DB_RETRY,
            )
            return "faulted"
        return "completed"
