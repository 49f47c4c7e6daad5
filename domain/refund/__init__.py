"""Refunds: the public interface (the servicer, the worker, carts' purchase limits).

Reads and writes take the caller's AsyncSession and never commit. After a
decision or retry commits, the caller starts the execution with
`start_execution(client, task_queue, refund.id, refund.execution_attempt)`
when `refund.state == EXECUTING` (the reconciler covers a crash in between).

Carts' purchase limits: `refunded_quantity(session, channel=, customer_ref=,
sku=, since=)` gives the units of a SKU refunded to a customer on orders
submitted since a time (completed refunds only).
"""

from temporalio import workflow

# Temporal's sandbox re-imports a workflow's module, and so this package, for
# every workflow run; without passing these through it would re-import
# SQLAlchemy and the order and inventory modules each time (seconds of CPU per
# run under load). None of them is used by the workflow code itself.
with workflow.unsafe.imports_passed_through():
    from domain.refund.activities import RefundActivities
    from domain.refund.gateway import (
        GatewayError,
        GatewayRefund,
        GatewayResult,
        PaymentGateway,
        SimulatedGateway,
        SimulatedRefund,
        configure_simulated_psp,
        simulated_psp_refunds,
    )
    from domain.refund.rules import (
        COMPLETED,
        DENIED,
        EXECUTING,
        FAULTED,
        PENDING_APPROVAL,
        STATES,
        LineInput,
        Refund,
        RefundLine,
        RefundTender,
        TenderRoom,
        WorkflowFault,
        idempotency_key,
        split_over_tenders,
        workflow_id,
    )
    from domain.refund.service import decide_refund, list_faults, list_refunds, retry_refund, submit_refund
    from domain.refund.starter import reconcile, start_execution
    from domain.refund.store import get_refund, refunded_quantity

from domain.refund.workflows import RefundExecutionInput, RefundExecutionWorkflow

__all__ = [
    "COMPLETED",
    "DENIED",
    "EXECUTING",
    "FAULTED",
    "PENDING_APPROVAL",
    "STATES",
    "GatewayError",
    "GatewayRefund",
    "GatewayResult",
    "LineInput",
    "PaymentGateway",
    "Refund",
    "RefundActivities",
    "RefundExecutionInput",
    "RefundExecutionWorkflow",
    "RefundLine",
    "RefundTender",
    "SimulatedGateway",
    "SimulatedRefund",
    "TenderRoom",
    "WorkflowFault",
    "configure_simulated_psp",
    "decide_refund",
    "get_refund",
    "idempotency_key",
    "list_faults",
    "list_refunds",
    "reconcile",
    "refunded_quantity",
    "retry_refund",
    "simulated_psp_refunds",
    "split_over_tenders",
    "start_execution",
    "submit_refund",
    "workflow_id",
]
