"""`entrepot worker` serves Prometheus metrics on its own port: the Temporal SDK's runtime
metrics and activity outcomes, scraped from a real worker process running real registration
workflows on the Temporal dev server and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.testing import WorkflowEnvironment

from domain.registration import starter
from domain.registration.submissions import registration_workflow_id
from server.devservices import free_port, stop_processes
from server.worker import ACTIVITY_EXECUTIONS
from tests.integration.registration_support import make_form, reg_db_url, reg_sessions, submit
from tests.procs import ROOT

__all__ = ["reg_db_url", "reg_sessions"]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def outcomes(samples: Samples, activity_type: str, task_queue: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (name, labels), value in samples.items():
        lab = dict(labels)
        if name == ACTIVITY_EXECUTIONS and lab.get("activity_type") == activity_type:
            if lab.get("task_queue") == task_queue:
                out[lab["outcome"]] = value
    return out


@pytest.fixture
def worker(reg_db_url: str, temporal_env: WorkflowEnvironment) -> Iterator[tuple[int, str]]:
    port, queue = free_port(), f"metrics-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "DATABASE_URL": reg_db_url,
        "TEMPORAL_ADDRESS": temporal_env.client.service_client.config.target_host,
        "TEMPORAL_TASK_QUEUE": queue,
        "ENTREPOT_WORKER_METRICS_PORT": str(port),
        "ENTREPOT_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "worker"], env=env, cwd=ROOT)
    try:
        yield port, queue
    finally:
        stop_processes([proc], timeout=15)


async def test_worker_serves_sdk_metrics_and_activity_outcomes(
    worker: tuple[int, str],
    temporal_env: WorkflowEnvironment,
    reg_sessions: async_sessionmaker[AsyncSession],
) -> None:
    port, queue = worker
    client = temporal_env.client
    form = await make_form(reg_sessions, f"metrics-{uuid.uuid4().hex[:6]}")
    reg = await submit(reg_sessions, form.slug)
    expires = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    await starter.start_registration(client, queue, reg.id, expires)
    # A registration that does not exist: validate raises on every attempt (Temporal retries it).
    missing = str(uuid.uuid4())
    await starter.start_registration(client, queue, missing, expires)

    deadline = time.monotonic() + 30
    while True:
        try:
            samples = await asyncio.to_thread(scrape, port)
        except (urllib.error.URLError, ConnectionError):
            samples = {}
        validate = outcomes(samples, "registration.validate", queue)
        if validate.get("completed", 0) >= 1 and validate.get("failed", 0) >= 1:
            break
        assert time.monotonic() < deadline, f"no activity outcomes on :{port} after 30 s: {validate}"
        await asyncio.sleep(0.3)
    for handle_id in (reg.id, missing):
        await client.get_workflow_handle(registration_workflow_id(handle_id)).terminate("test done")

    names = {name for name, _ in samples}
    # The SDK's own metrics, from the same endpoint (worker slots, polls, latencies in seconds).
    assert any(n.startswith("temporal_worker_task_slots_available") for n in names), sorted(names)[:40]
    assert any(n.startswith("temporal_activity_execution_latency") for n in names), sorted(names)[:40]


def test_a_taken_worker_metrics_port_is_one_line_and_exit_2(database_url: str) -> None:
    # The worker first checks that something answers at TEMPORAL_ADDRESS: a listening
    # socket stands in for Temporal, which the worker never reaches (the port check comes first).
    with socket.socket() as taken, socket.socket() as temporal:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        temporal.bind(("127.0.0.1", 0))
        temporal.listen()
        port = taken.getsockname()[1]
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "TEMPORAL_ADDRESS": f"127.0.0.1:{temporal.getsockname()[1]}",
            "ENTREPOT_WORKER_METRICS_PORT": str(port),
        }
        done = subprocess.run(
            [sys.executable, "-m", "server.cli", "worker"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "ENTREPOT_WORKER_METRICS_PORT" in done.stderr, done.stderr
