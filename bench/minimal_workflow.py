"""The baseline for bench/refunds.py: one workflow, one no-op activity."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow


@activity.defn(name="bench.noop")
async def noop(value: str) -> str:
    return value


@workflow.defn(name="BenchMinimalWorkflow")
class MinimalWorkflow:
    @workflow.run
    async def run(self, value: str) -> str:
        return str(
            await workflow.execute_activity("bench.noop", value, start_to_close_timeout=timedelta(seconds=30))
        )
