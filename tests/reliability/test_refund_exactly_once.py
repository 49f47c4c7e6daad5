"""R5: exactly-once refunds.

A real `entrepot worker` process is SIGKILLed after the gateway recorded a
refund but before the activity completed; approvals and retries race around
it; a new worker finishes the job. Afterwards: one gateway refund per
(refund, tender), and never more refunded than captured.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import IO

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.testing import WorkflowEnvironment

import domain.refund as refunds
from domain.shared.caller import Caller
from domain.shared.uow import UnitOfWork
from entrepot.platform.v1 import types_pb2
from entrepot.refund.v1 import refund_pb2
from entrepot_client import Entrepot, FailedPreconditionError
from server.app import App
from server.settings import Settings
from server.worker import build_worker
from tests.conftest import TEST_SECRET, make_settings, unique
from tests.procs import ROOT
from tests.refund_support import R, get_order, make_order, wait_state

D = refund_pb2.DecideRefundApprovalRequest


def eur(amount: int) -> types_pb2.Money:
    return types_pb2.Money(currency_code="EUR", amount_minor=amount)


async def configure(sessions: async_sessionmaker[AsyncSession], ref: str, **kw: object) -> None:
    async with UnitOfWork(sessions) as uow:
        await refunds.configure_simulated_psp(uow.session, ref, **kw)  # type: ignore[arg-type]
        await uow.commit()


async def psp(sessions: async_sessionmaker[AsyncSession], ref: str) -> list[refunds.SimulatedRefund]:
    async with sessions() as s, s.begin():
        return await refunds.simulated_psp_refunds(s, ref)


def worker_process(
    database_url: str, temporal_address: str, queue: str, log: IO[bytes] | None = None
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "TEMPORAL_ADDRESS": temporal_address,
        "TEMPORAL_TASK_QUEUE": queue,
        "ENTREPOT_JWT_HS256_SECRET": TEST_SECRET,
        "ENTREPOT_LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen([sys.executable, "-m", "server.cli", "worker"], env=env, cwd=ROOT, stderr=log)


async def test_worker_killed_between_gateway_and_completion(
    database_url: str,
    settings: Settings,
    temporal_env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
    make_token: Callable[..., str],
    test_channel: str,
) -> None:
    # A second server whose refund executions go to a queue served only by the
    # worker process we kill.
    queue = f"r5-{uuid.uuid4().hex[:8]}"
    address = temporal_env.client.service_client.config.target_host
    app2 = App(make_settings(database_url, address, temporal_task_queue=queue))
    app2.rt._temporal = temporal_env.client
    await app2.start()
    target = f"127.0.0.1:{app2.port}"
    clients: list[Entrepot] = []

    def client(sub: str, *perms: str) -> Entrepot:
        c = Entrepot(target, make_token(list(perms), ["*"], sub), test_channel)
        clients.append(c)
        return c

    proc = worker_process(database_url, address, queue)
    try:
        hang, other = unique("card"), unique("gift")
        # The card (captured last, so refunded first) charges and then hangs far
        # beyond the activity's heartbeat timeout: the worker dies mid-call.
        await configure(sessions, hang, timeout_after_charge_times=1, timeout_seconds=600)
        order_id = await make_order(
            sessions,
            [("l1", unique("SKU").upper(), 1, 3000)],
            [("t-gift", "gift", 1000, other), ("t-card", "card", 2000, hang)],
        )
        alice = client("alice", "refund.request", "refund.read")
        r = await alice.refund.submit_refund_for_approval(
            refund_pb2.SubmitRefundForApprovalRequest(
                order_id=order_id, amount=eur(2500), reason="r5", request_id=unique("req")
            )
        )
        approvers = [client(f"approver-{i}", "refund.approve", "refund.read") for i in range(6)]
        results = await asyncio.gather(
            *(
                a.refund.decide_refund_approval(
                    D(refund_id=r.refund_id, decision=D.DECISION_APPROVE, note="ok", request_id=unique("d"))
                )
                for a in approvers
            ),
            return_exceptions=True,
        )
        assert sum(isinstance(x, refund_pb2.Refund) for x in results) == 1

        deadline = time.monotonic() + 60
        while not await psp(sessions, hang):
            assert time.monotonic() < deadline, "the gateway never recorded the refund"
            assert proc.poll() is None, "the worker process exited"
            await asyncio.sleep(0.1)
        proc.kill()  # SIGKILL: the activity never reports back
        proc.wait(10)

        # While it is stuck: more approvals and retries race; none may act.
        racing = await asyncio.gather(
            *(
                a.refund.decide_refund_approval(
                    D(
                        refund_id=r.refund_id,
                        decision=D.DECISION_APPROVE,
                        note="again",
                        request_id=unique("d"),
                    )
                )
                for a in approvers[:3]
            ),
            *(
                a.refund.retry_refund_execution(
                    refund_pb2.RetryRefundExecutionRequest(refund_id=r.refund_id, request_id=unique("rt"))
                )
                for a in approvers[3:]
            ),
            return_exceptions=True,
        )
        assert all(isinstance(x, FailedPreconditionError) for x in racing), racing

        worker = build_worker(temporal_env.client, app2.rt, queue)
        assert worker is not None
        async with worker:
            done = await wait_state(approvers[0], r.refund_id, timeout=90)
        assert done.state == R.STATE_COMPLETED, done.fault_message
        card = next(t for t in done.tenders if t.tender_id == "t-card")
        assert card.attempts == 2  # the killed attempt and the one that found the refund by its key

        paid_card, paid_gift = await psp(sessions, hang), await psp(sessions, other)
        assert [(p.amount_minor, p.idempotency_key) for p in paid_card] == [
            (2000, refunds.idempotency_key(r.refund_id, "t-card"))
        ]
        assert [p.amount_minor for p in paid_gift] == [500]
        order = await get_order(sessions, order_id)
        for p in order.payments:
            assert p.refunded.amount_minor <= p.captured.amount_minor
        assert sum(p.refunded.amount_minor for p in order.payments) == 2500
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for c in clients:
            await c.close()
        await app2.stop(grace=1.0)


async def test_concurrent_retries_of_a_fault_have_one_effect(
    sessions: async_sessionmaker[AsyncSession], client_factory: Callable[..., Entrepot]
) -> None:
    gift, card = unique("gift"), unique("card")
    await configure(sessions, gift, fail_forever=True)
    order_id = await make_order(
        sessions,
        [("l1", unique("SKU").upper(), 1, 2000)],
        [("t-gift", "gift", 1000, gift), ("t-card", "card", 1000, card)],
    )
    alice = client_factory(permissions=["refund.request", "refund.read"], sub="alice")
    r = await alice.refund.submit_refund_for_approval(
        refund_pb2.SubmitRefundForApprovalRequest(
            order_id=order_id, amount=eur(2000), reason="x", request_id=unique("q")
        )
    )
    ops = [client_factory(permissions=["refund.approve", "refund.read"], sub=f"op-{i}") for i in range(6)]
    await ops[0].refund.decide_refund_approval(
        D(refund_id=r.refund_id, decision=D.DECISION_APPROVE, note="ok", request_id=unique("d"))
    )
    assert (await wait_state(ops[0], r.refund_id)).state == R.STATE_FAULTED
    await configure(sessions, gift)
    results = await asyncio.gather(
        *(
            o.refund.retry_refund_execution(
                refund_pb2.RetryRefundExecutionRequest(refund_id=r.refund_id, request_id=unique("rt"))
            )
            for o in ops
        ),
        return_exceptions=True,
    )
    ok = [x for x in results if isinstance(x, refund_pb2.Refund)]
    assert len(ok) == 1 and ok[0].execution_attempt == 2
    assert all(isinstance(x, FailedPreconditionError) for x in results if x not in ok)
    assert (await wait_state(ops[0], r.refund_id)).state == R.STATE_COMPLETED
    assert [p.amount_minor for p in await psp(sessions, card)] == [1000]
    assert [p.amount_minor for p in await psp(sessions, gift)] == [1000]
    order = await get_order(sessions, order_id)
    assert sum(p.refunded.amount_minor for p in order.payments) == 2000


async def test_reconciler_starts_an_approval_that_lost_its_workflow_start(
    settings: Settings,
    temporal_env: WorkflowEnvironment,
    sessions: async_sessionmaker[AsyncSession],
    client_factory: Callable[..., Entrepot],
    app: App,
) -> None:
    ref = unique("card")
    order_id = await make_order(
        sessions, [("l1", unique("SKU").upper(), 1, 1000)], [("t1", "card", 1000, ref)]
    )
    alice = client_factory(permissions=["refund.request", "refund.read"], sub="alice")
    r = await alice.refund.submit_refund_for_approval(
        refund_pb2.SubmitRefundForApprovalRequest(
            order_id=order_id, amount=eur(700), reason="x", request_id=unique("q")
        )
    )
    # The approval commits, then the process "dies" before starting the workflow.
    async with UnitOfWork(sessions) as uow:
        await refunds.decide_refund(
            uow.session, r.refund_id, channel="test", approve=True, note="", caller=Caller(subject="bob")
        )
        await uow.commit()
    await asyncio.sleep(1.0)
    assert await psp(sessions, ref) == []
    started = await refunds.reconcile(
        sessions, temporal_env.client, settings.temporal_task_queue, older_than_seconds=0
    )
    assert started >= 1
    done = await wait_state(alice, r.refund_id)
    assert done.state == R.STATE_COMPLETED
    # Reconciling again finds nothing to start and pays nothing twice.
    await refunds.reconcile(sessions, temporal_env.client, settings.temporal_task_queue, older_than_seconds=0)
    assert [p.amount_minor for p in await psp(sessions, ref)] == [700]
