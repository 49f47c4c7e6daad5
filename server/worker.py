"""The Temporal worker: every module's workflows and activities on one task queue.

Every module's workflows are in WORKFLOWS and its activity factory (it takes the
Runtime and returns the activity callables, bound methods of an object holding the
session factory) in ACTIVITY_FACTORIES, both here.

Metrics: with ENTREPOT_WORKER_METRICS_PORT set, the Temporal SDK's own Prometheus exporter
serves its runtime metrics (`temporal_*`: task slots, polls, activity and workflow latencies)
and `entrepot_activity_executions_total{activity_type, outcome}` on that port.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any

import temporalio.exceptions
from temporalio import activity
from temporalio.client import Client
from temporalio.runtime import PrometheusConfig, TelemetryConfig
from temporalio.runtime import Runtime as TemporalRuntime
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

import domain.refund as refunds
from domain import registration
from server.runtime import Runtime
from server.settings import Settings

log = logging.getLogger("entrepot.worker")


def refund_activities(rt: Runtime) -> Sequence[Callable[..., Any]]:
    return refunds.RefundActivities(rt.sessions, refunds.SimulatedGateway(rt.sessions)).all()


def registration_activities(rt: Runtime) -> Sequence[Callable[..., Any]]:
    return registration.RegistrationActivities(rt.sessions).all()


WORKFLOWS: list[type] = [refunds.RefundExecutionWorkflow, *registration.WORKFLOWS]
ACTIVITY_FACTORIES: list[Callable[[Runtime], Sequence[Callable[..., Any]]]] = [
    refund_activities,
    registration_activities,
]

# The sandbox re-imports a workflow's modules for every run; our domain packages
# (and the database libraries they import) are deterministic to import and
# heavy, so they are passed through: measured 0.2 -> ~5 refund workflows/s.
SANDBOX = SandboxedWorkflowRunner(
    restrictions=SandboxRestrictions.default.with_passthrough_modules(
        "domain", "sqlalchemy", "asyncpg", "pydantic", "pydantic_core", "google.protobuf"
    )
)


ACTIVITY_EXECUTIONS = "entrepot_activity_executions_total"


class _CountOutcome(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        outcome = "failed"
        try:
            result = await super().execute_activity(input)
            outcome = "completed"
            return result
        except (asyncio.CancelledError, temporalio.exceptions.CancelledError):
            outcome = "cancelled"
            raise
        finally:
            # The activity's meter carries namespace, task_queue and activity_type.
            counter = activity.metric_meter().create_counter(
                ACTIVITY_EXECUTIONS, "Activity executions (attempts) by type and outcome"
            )
            counter.add(1, {"outcome": outcome})


class ActivityOutcomes(Interceptor):
    """Counts every activity attempt: completed, failed (raised; Temporal may retry it) or cancelled."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _CountOutcome(next)


def build_worker(client: Client, rt: Runtime, task_queue: str) -> Worker | None:
    """None while no module has registered workflows or activities."""
    activities = [a for factory in ACTIVITY_FACTORIES for a in factory(rt)]
    if not WORKFLOWS and not activities:
        return None
    return Worker(
        client,
        task_queue=task_queue,
        workflows=WORKFLOWS,
        activities=activities,
        workflow_runner=SANDBOX,
        interceptors=[ActivityOutcomes()],
    )


class MetricsPortError(Exception):
    """The worker's metrics port cannot be bound (one line for the CLI)."""


def temporal_runtime(settings: Settings) -> TemporalRuntime | None:
    """A Temporal runtime exporting Prometheus metrics on the worker's port (None: port 0, off)."""
    if not settings.worker_metrics_port:
        return None
    address = f"{settings.metrics_host}:{settings.worker_metrics_port}"
    prometheus = PrometheusConfig(bind_address=address, durations_as_seconds=True)
    try:
        return TemporalRuntime(telemetry=TelemetryConfig(metrics=prometheus))
    except ValueError as exc:  # how the SDK's core reports a failed bind
        raise MetricsPortError(
            f"worker metrics cannot listen on {address} ({exc}); "
            "set ENTREPOT_WORKER_METRICS_PORT to a free port, 0 disables"
        ) from exc


async def run_worker(settings: Settings) -> None:
    metrics = temporal_runtime(settings)
    rt = Runtime(settings)
    rt.temporal_runtime = metrics
    client = await rt.temporal()
    worker = build_worker(client, rt, settings.temporal_task_queue)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if worker is None:
        log.warning("no workflows or activities registered; worker idle")
        await stop.wait()
    else:
        async with worker:
            log.info("worker running", extra={"task_queue": settings.temporal_task_queue})
            await stop.wait()
            log.info("worker draining")
    await rt.close()
