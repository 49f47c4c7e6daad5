"""R11: Temporal outages cost nothing.

A real `entrepot serve` process and a real `entrepot worker` process run against
a Temporal dev server of their own (persisted to a file, so it can be stopped and
started again on the same port). The dev server is stopped for 8 s (30 s with
ENTREPOT_SOAK=long) while refunds are approved and registrations submitted:
every call answers OK (the approval commits, the registration is stored) and
health reports entrepot.temporal NOT_SERVING. Once Temporal is back, the
reconcilers (server/background.py) start every missing workflow exactly once,
and nothing executes twice: one workflow run per refund and registration, one
payment-provider refund per tender, one workflow transition per registration.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client

import domain.refund as refunds
import migrations
from domain.registration.submissions import registration_workflow_id
from domain.shared.db import make_engine, make_session_factory
from entrepot.refund.v1 import refund_pb2
from entrepot.registration.v1 import registration_pb2 as reg_pb
from entrepot_client import Entrepot
from server.devservices import free_port, start_temporal_dev_server, stop_process_group
from tests import pg
from tests.conftest import TEST_CHANNEL, unique
from tests.integration.test_registration_grpc import make_form, submit
from tests.procs import ServerProcess, server_token
from tests.refund_support import R, make_order, wait_state
from tests.reliability.support import soak
from tests.reliability.test_refund_exactly_once import eur, psp, worker_process

OUTAGE_SECONDS = soak(8, 30)
D = refund_pb2.DecideRefundApprovalRequest
NOT_SERVING, SERVING = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING
Sessions = async_sessionmaker[AsyncSession]


async def health(target: str, service: str) -> int:
    async with grpc.aio.insecure_channel(target) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
    return int(resp.status)


async def wait_health(target: str, service: str, status: int, timeout: float) -> float:
    """Seconds until `service` reports `status`."""
    start = time.monotonic()
    while await health(target, service) != status:
        assert time.monotonic() - start < timeout, f"{service} never became {status}"
        await asyncio.sleep(0.2)
    return time.monotonic() - start


async def runs(client: Client, workflow_id: str) -> list[float]:
    """Start times (epoch seconds) of every run Temporal lists under this workflow id
    (visibility lags a little behind a start)."""
    deadline = time.monotonic() + 10
    while True:
        found = [
            w.start_time.timestamp() async for w in client.list_workflows(f"WorkflowId = '{workflow_id}'")
        ]
        if found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.5)


async def left_submitted(sessions: Sessions, registration_id: str) -> int:
    """How many times the registration's state history left `submitted` (the workflow's first step)."""
    async with sessions() as s:
        return int(
            (
                await s.execute(
                    text(
                        "SELECT count(*) FROM registration.history "
                        "WHERE registration_id = :r AND from_state = 'submitted'"
                    ),
                    {"r": registration_id},
                )
            ).scalar_one()
        )


async def left_submitted_state(ep: Entrepot, registration_id: str, timeout: float) -> None:
    """Waits for the registration workflow's first step (it moves every registration on)."""
    deadline = time.monotonic() + timeout
    request = reg_pb.GetRegistrationRequest(id=registration_id)
    while (await ep.registration.get_registration(request)).state == reg_pb.Registration.STATE_SUBMITTED:
        assert time.monotonic() < deadline, f"registration {registration_id} never left submitted"
        await asyncio.sleep(0.5)


@pytest.fixture
def r11_database() -> Iterator[str]:
    """A database of its own: the session's app runs reconcilers too, and they would start
    this test's workflows on the session's Temporal."""
    url, name = pg.create_database("entrepot_r11")
    migrations.upgrade(url)
    try:
        yield url
    finally:
        pg.drop_database(name)


@pytest.fixture
async def r11_sessions(r11_database: str) -> AsyncIterator[Sessions]:
    engine = make_engine(r11_database, pool_size=5, max_overflow=5)
    sessions = make_session_factory(engine)
    async with sessions() as s:
        await s.execute(
            text(
                "INSERT INTO platform.channels (slug, name, currency, timezone) VALUES (:s, 'R11', 'EUR', 'UTC')"
            ),
            {"s": TEST_CHANNEL},
        )
        await s.commit()
    yield sessions
    await engine.dispose()


async def test_a_temporal_outage_loses_nothing_and_runs_nothing_twice(
    r11_database: str, r11_sessions: Sessions, tmp_path: Path
) -> None:
    database_url, sessions = r11_database, r11_sessions
    port = free_port()
    address = f"127.0.0.1:{port}"
    db_file, temporal_log = tmp_path / "temporal.db", tmp_path / "temporal.log"
    temporal = start_temporal_dev_server(db_file, port=port, log_file=temporal_log)
    queue = f"r11-{uuid.uuid4().hex[:8]}"
    server = ServerProcess(
        database_url,
        tmp_path,
        temporal_address=address,
        TEMPORAL_TASK_QUEUE=queue,
        ENTREPOT_LOG_LEVEL="WARNING",
    )
    server.start()
    worker_log = tmp_path / "worker.log"
    worker = worker_process(database_url, address, queue, worker_log.open("wb"))
    clients: list[Entrepot] = []

    def client(sub: str, *perms: str) -> Entrepot:
        c = Entrepot(server.target, server_token(sub, list(perms) or ["*"]), TEST_CHANNEL)
        clients.append(c)
        return c

    admin = client("r11-admin")
    alice = client("alice", "refund.request", "refund.read")
    bob = client("bob", "refund.approve", "refund.read")
    refunds_done: list[tuple[str, str, int]] = []  # (refund id, gateway reference, amount)
    registrations: list[str] = []
    try:
        form = await make_form(admin)

        async def submit_refund() -> tuple[str, str, int]:
            ref, amount = unique("card"), 700
            order_id = await make_order(
                sessions, [("l1", unique("SKU").upper(), 1, 1000)], [("t1", "card", 1000, ref)]
            )
            r = await alice.refund.submit_refund_for_approval(
                refund_pb2.SubmitRefundForApprovalRequest(
                    order_id=order_id, amount=eur(amount), reason="r11", request_id=unique("q")
                )
            )
            return r.refund_id, ref, amount

        async def approve(refund_id: str) -> float:
            t0 = time.monotonic()
            r = await bob.refund.decide_refund_approval(
                D(refund_id=refund_id, decision=D.DECISION_APPROVE, note="ok", request_id=unique("d")),
                timeout=30,
            )
            assert r.state == R.STATE_EXECUTING
            return time.monotonic() - t0

        async def register() -> float:
            t0 = time.monotonic()
            reg = await submit(admin, form)
            registrations.append(reg.id)
            return time.monotonic() - t0

        # Before: the normal path works on this Temporal.
        before = await submit_refund()
        await approve(before[0])
        refunds_done.append(before)
        await register()
        assert (await wait_state(bob, before[0], timeout=120)).state == R.STATE_COMPLETED
        await left_submitted_state(admin, registrations[0], timeout=60)
        assert await health(server.target, "entrepot.temporal") == SERVING

        # The outage.
        stop_process_group(temporal, timeout=10)
        stopped_at = time.monotonic()
        detected = await wait_health(server.target, "entrepot.temporal", NOT_SERVING, timeout=10)
        during: list[tuple[str, str, int]] = []
        latencies: list[float] = []
        while time.monotonic() - stopped_at < OUTAGE_SECONDS:
            pending = await submit_refund()
            latencies.append(await approve(pending[0]))
            during.append(pending)
            latencies.append(await register())
            assert await health(server.target, "entrepot.temporal") == NOT_SERVING
            assert await health(server.target, "") == SERVING  # the database side still serves
        assert during, "no approval fell inside the outage"
        # Nothing waits for Temporal: the health check already knows it is gone.
        assert max(latencies) < 5, latencies
        outage_registrations = len(registrations) - 1
        refunds_done += during
        assert worker.poll() is None, f"the worker died during the outage: {worker_log.read_text()[-3000:]}"

        temporal = start_temporal_dev_server(db_file, port=port, log_file=temporal_log)
        back_at = time.time()
        recovered = await wait_health(server.target, "entrepot.temporal", SERVING, timeout=30)

        # Everything finishes: the reconcilers start what the outage left unstarted.
        for refund_id, _, _ in refunds_done:
            done = await wait_state(bob, refund_id, timeout=180)
            assert done.state == R.STATE_COMPLETED, done.fault_message
        for reg_id in registrations:
            await left_submitted_state(admin, reg_id, timeout=180)

        # Exactly once: one run per workflow, one gateway call per refund, one first step.
        temporal_client = await Client.connect(address)
        started_after = duplicates = 0
        for refund_id, ref, amount in refunds_done:
            wf = (await bob.refund.get_refund(refund_pb2.GetRefundRequest(refund_id=refund_id))).workflow_id
            starts = await runs(temporal_client, wf)
            duplicates += len(starts) - 1
            started_after += sum(t >= back_at - 1 for t in starts)
            assert len(starts) == 1, (refund_id, starts)
            paid = await psp(sessions, ref)
            assert [(p.amount_minor, p.idempotency_key) for p in paid] == [
                (amount, refunds.idempotency_key(refund_id, "t1"))
            ]
        for reg_id in registrations:
            starts = await runs(temporal_client, registration_workflow_id(reg_id))
            duplicates += len(starts) - 1
            started_after += sum(t >= back_at - 1 for t in starts)
            assert len(starts) == 1, (reg_id, starts)
            assert await left_submitted(sessions, reg_id) == 1
        assert started_after == len(during) + outage_registrations
        assert duplicates == 0
        print(
            f"\nR11: Temporal down {OUTAGE_SECONDS}s (NOT_SERVING after {detected:.1f}s, SERVING "
            f"{recovered:.1f}s after restart); {len(during)} refunds approved and "
            f"{outage_registrations} registrations submitted during the outage, every call OK "
            f"(slowest {max(latencies):.2f}s); {started_after} workflows started after it; "
            f"{duplicates} duplicate runs, 0 duplicate payments"
        )
    finally:
        for c in clients:
            await c.close()
        if worker.poll() is None:
            worker.terminate()
            worker.wait(15)
        server.__exit__(None, None, None)
        stop_process_group(temporal, timeout=10)
