"""RefundService through real gRPC, real PostgreSQL and a real Temporal dev server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

import domain.refund as refunds
from domain.shared.uow import UnitOfWork
from entrepot.platform.v1 import types_pb2
from entrepot.refund.v1 import refund_pb2
from entrepot_client import (
    Entrepot,
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
)
from tests.conftest import unique
from tests.refund_support import R, get_order, history_codes, make_order, make_stock, on_hand, wait_state

D = refund_pb2.DecideRefundApprovalRequest
TS = refund_pb2.RefundTender


@pytest.fixture
async def alice(client_factory: Callable[..., Entrepot]) -> Entrepot:
    return client_factory(permissions=["refund.request", "refund.read"], sub="alice")


@pytest.fixture
async def bob(client_factory: Callable[..., Entrepot]) -> Entrepot:
    return client_factory(permissions=["refund.approve", "refund.read"], sub="bob")


def submit(**kw: object) -> refund_pb2.SubmitRefundForApprovalRequest:
    kw.setdefault("reason", "damaged in transit")
    kw.setdefault("request_id", unique("req"))
    return refund_pb2.SubmitRefundForApprovalRequest(**kw)  # type: ignore[arg-type]


def approve(refund_id: str, note: str = "ok") -> refund_pb2.DecideRefundApprovalRequest:
    return D(refund_id=refund_id, decision=D.DECISION_APPROVE, note=note, request_id=unique("dec"))


def eur(amount: int) -> types_pb2.Money:
    return types_pb2.Money(currency_code="EUR", amount_minor=amount)


async def psp(sessions: async_sessionmaker[AsyncSession], ref: str) -> list[refunds.SimulatedRefund]:
    async with sessions() as s, s.begin():
        return await refunds.simulated_psp_refunds(s, ref)


async def configure(sessions: async_sessionmaker[AsyncSession], ref: str, **kw: object) -> None:
    async with UnitOfWork(sessions) as uow:
        await refunds.configure_simulated_psp(uow.session, ref, **kw)  # type: ignore[arg-type]
        await uow.commit()


async def test_multi_tender_split_restock_and_history(
    sessions: async_sessionmaker[AsyncSession], alice: Entrepot, bob: Entrepot
) -> None:
    sku_a, sku_b = unique("SKU-A").upper(), unique("SKU-B").upper()
    gift, card = unique("gift"), unique("card")
    customer = unique("cust")
    # 2 x 1000 + 1 x 500 = 2500, paid 1000 by gift card first, then 1500 by card.
    order_id = await make_order(
        sessions,
        [("l1", sku_a, 2, 1000), ("l2", sku_b, 1, 500)],
        [("t-gift", "gift_card", 1000, gift), ("t-card", "card", 1500, card)],
        customer=customer,
    )
    wh = await make_stock(sessions, [sku_a, sku_b], 5)
    r = await alice.refund.submit_refund_for_approval(
        submit(
            order_id=order_id,
            lines=[refund_pb2.RefundLineInput(line_id="l1", quantity=2)],
            restock=True,
            restock_warehouse_code=wh,
        )
    )
    assert r.state == R.STATE_PENDING_APPROVAL
    assert r.amount.amount_minor == 2000
    # Reverse capture order: the card (captured last) first, then the gift card.
    assert [(t.tender_id, t.amount.amount_minor) for t in r.tenders] == [("t-card", 1500), ("t-gift", 500)]
    inbox = await bob.refund.list_refund_requests(
        refund_pb2.ListRefundRequestsRequest(states=[R.STATE_PENDING_APPROVAL], order_id=order_id)
    )
    assert [x.refund_id for x in inbox.refunds] == [r.refund_id]

    decided = await bob.refund.decide_refund_approval(approve(r.refund_id))
    assert decided.state == R.STATE_EXECUTING
    assert decided.workflow_id == f"refund-{r.refund_id}"
    done = await wait_state(bob, r.refund_id)
    assert done.state == R.STATE_COMPLETED, done.fault_message
    assert all(t.state == TS.STATE_SUCCEEDED and t.gateway_refund_id for t in done.tenders)

    assert [(p.amount_minor, p.idempotency_key) for p in await psp(sessions, card)] == [
        (1500, refunds.idempotency_key(r.refund_id, "t-card"))
    ]
    assert [p.amount_minor for p in await psp(sessions, gift)] == [500]
    order = await get_order(sessions, order_id)
    assert {p.tender_id: p.refunded.amount_minor for p in order.payments} == {"t-gift": 500, "t-card": 1500}
    assert {li.line_id: li.refunded_quantity for li in order.lines} == {"l1": 2, "l2": 0}
    assert await on_hand(sessions, sku_a, wh) == 7
    assert await on_hand(sessions, sku_b, wh) == 5
    codes = [c for c in await history_codes(sessions, order_id) if c.startswith("refund:")]
    assert codes == [
        "refund:requested",
        "refund:approved",
        "refund:tender_refunded",
        "refund:tender_refunded",
        "refund:restocked",
        "refund:completed",
    ]
    async with sessions() as s, s.begin():
        since = datetime.now(UTC) - timedelta(days=30)
        got = await refunds.refunded_quantity(
            s, channel="test", customer_ref=customer, sku=sku_a, since=since
        )
        assert got == 2
        assert (
            await refunds.refunded_quantity(s, channel="test", customer_ref=customer, sku=sku_b, since=since)
            == 0
        )


async def test_over_refund_rejected_counting_pending(
    sessions: async_sessionmaker[AsyncSession], alice: Entrepot
) -> None:
    order_id = await make_order(
        sessions,
        [("l1", unique("SKU").upper(), 1, 2500)],
        [("t1", "card", 1000, unique("r")), ("t2", "card", 1500, unique("r"))],
    )
    with pytest.raises(FailedPreconditionError) as exc:
        await alice.refund.submit_refund_for_approval(submit(order_id=order_id, amount=eur(2501)))
    assert exc.value.reason == "REFUND_EXCEEDS_REFUNDABLE"
    assert exc.value.precondition_violations
    first = await alice.refund.submit_refund_for_approval(submit(order_id=order_id, amount=eur(2000)))
    assert [(t.tender_id, t.amount.amount_minor) for t in first.tenders] == [("t2", 1500), ("t1", 500)]
    # 2000 is pending: only 500 is left, on t1.
    with pytest.raises(FailedPreconditionError) as exc:
        await alice.refund.submit_refund_for_approval(submit(order_id=order_id, amount=eur(501)))
    assert exc.value.reason == "REFUND_EXCEEDS_REFUNDABLE"
    with pytest.raises(FailedPreconditionError):
        await alice.refund.submit_refund_for_approval(
            submit(
                order_id=order_id, lines=[refund_pb2.RefundLineInput(line_id="l1", quantity=2)], amount=eur(1)
            )
        )
    rest = await alice.refund.submit_refund_for_approval(submit(order_id=order_id, amount=eur(500)))
    assert [(t.tender_id, t.amount.amount_minor) for t in rest.tenders] == [("t1", 500)]
    with pytest.raises(InvalidArgumentError) as bad:
        await alice.refund.submit_refund_for_approval(submit(order_id=order_id, reason=""))
    assert {v.field for v in bad.value.field_violations} >= {"reason", "lines"}


async def test_concurrent_submissions_never_overcommit(
    sessions: async_sessionmaker[AsyncSession], alice: Entrepot
) -> None:
    order_id = await make_order(
        sessions, [("l1", unique("SKU").upper(), 1, 1000)], [("t1", "card", 1000, unique("r"))]
    )
    results = await asyncio.gather(
        *(
            alice.refund.submit_refund_for_approval(submit(order_id=order_id, amount=eur(300)))
            for _ in range(8)
        ),
        return_exceptions=True,
    )
    ok = [x for x in results if isinstance(x, refund_pb2.Refund)]
    refused = [x for x in results if isinstance(x, FailedPreconditionError)]
    assert len(ok) == 3 and len(refused) == 5


async def test_self_approval_refused_and_permission_needed(
    sessions: async_sessionmaker[AsyncSession], client_factory: Callable[..., Entrepot]
) -> None:
    order_id = await make_order(
        sessions, [("l1", unique("SKU").upper(), 1, 1000)], [("t1", "card", 1000, unique("r"))]
    )
    carol = client_factory(permissions=["refund.request", "refund.approve", "refund.read"], sub="carol")
    r = await carol.refund.submit_refund_for_approval(submit(order_id=order_id, amount=eur(100)))
    with pytest.raises(PermissionDeniedError) as exc:
        await carol.refund.decide_refund_approval(approve(r.refund_id))
    assert exc.value.reason == "SELF_APPROVAL_FORBIDDEN"
    requester_only = client_factory(permissions=["refund.request", "refund.read"], sub="dave")
    with pytest.raises(PermissionDeniedError):
        await requester_only.refund.decide_refund_approval(approve(r.refund_id))
    still = await carol.refund.get_refund(refund_pb2.GetRefundRequest(refund_id=r.refund_id))
    assert still.state == R.STATE_PENDING_APPROVAL
    # Withdrawing one's own request is fine.
    withdrawn = await carol.refund.decide_refund_approval(
        D(refund_id=r.refund_id, decision=D.DECISION_DENY, note="entered twice", request_id=unique("d"))
    )
    assert withdrawn.state == R.STATE_DENIED and withdrawn.decided_by == "carol"


async def test_empty_refund_completes_at_once(
    sessions: async_sessionmaker[AsyncSession], alice: Entrepot, bob: Entrepot
) -> None:
    sku = unique("SKU").upper()
    order_id = await make_order(sessions, [("l1", sku, 3, 1000)], [("t1", "card", 3000, unique("r"))])
    wh = await make_stock(sessions, [sku], 2)
    r = await alice.refund.submit_refund_for_approval(
        submit(
            order_id=order_id,
            lines=[refund_pb2.RefundLineInput(line_id="l1", quantity=1)],
            amount=eur(0),
            restock=True,
            restock_warehouse_code=wh,
        )
    )
    assert list(r.tenders) == []
    done = await bob.refund.decide_refund_approval(approve(r.refund_id))
    assert done.state == R.STATE_COMPLETED
    assert await on_hand(sessions, sku, wh) == 3
    order = await get_order(sessions, order_id)
    assert order.lines[0].refunded_quantity == 1
    assert order.payments[0].refunded.amount_minor == 0


async def test_concurrent_decisions_have_one_effect(
    sessions: async_sessionmaker[AsyncSession], alice: Entrepot, client_factory: Callable[..., Entrepot]
) -> None:
    ref = unique("card")
    order_id = await make_order(
        sessions, [("l1", unique("SKU").upper(), 1, 1000)], [("t1", "card", 1000, ref)]
    )
    r = await alice.refund.submit_refund_for_approval(submit(order_id=order_id, amount=eur(1000)))
    deciders = [
        client_factory(permissions=["refund.approve", "refund.read"], sub=f"approver-{i}") for i in range(8)
    ]
    calls = [d.refund.decide_refund_approval(approve(r.refund_id)) for d in deciders[:6]]
    calls += [
        d.refund.decide_refund_approval(
            D(refund_id=r.refund_id, decision=D.DECISION_DENY, note="no", request_id=unique("x"))
        )
        for d in deciders[6:]
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    ok = [x for x in results if isinstance(x, refund_pb2.Refund)]
    assert len(ok) == 1
    assert all(
        isinstance(x, FailedPreconditionError) and x.reason == "REFUND_ALREADY_DECIDED"
        for x in results
        if x not in ok
    )
    final = await wait_state(deciders[0], r.refund_id, (R.STATE_COMPLETED, R.STATE_FAULTED, R.STATE_DENIED))
    if ok[0].state == R.STATE_DENIED:
        assert final.state == R.STATE_DENIED and await psp(sessions, ref) == []
    else:
        assert final.state == R.STATE_COMPLETED
        assert len(await psp(sessions, ref)) == 1


async def test_transient_gateway_failures_are_retried_with_the_same_key(
    sessions: async_sessionmaker[AsyncSession], alice: Entrepot, bob: Entrepot
) -> None:
    ref = unique("card")
    await configure(sessions, ref, fail_times=2)
    order_id = await make_order(
        sessions, [("l1", unique("SKU").upper(), 1, 1000)], [("t1", "card", 1000, ref)]
    )
    r = await alice.refund.submit_refund_for_approval(submit(order_id=order_id, amount=eur(400)))
    await bob.refund.decide_refund_approval(approve(r.refund_id))
    done = await wait_state(bob, r.refund_id)
    assert done.state == R.STATE_COMPLETED
    assert done.tenders[0].attempts == 3
    paid = await psp(sessions, ref)
    assert [(p.amount_minor, p.idempotency_key) for p in paid] == [(400, r.tenders[0].idempotency_key)]


async def test_fault_then_retry_resumes_only_unfinished_tenders(
    sessions: async_sessionmaker[AsyncSession], alice: Entrepot, bob: Entrepot
) -> None:
    gift, card = unique("gift"), unique("card")
    await configure(sessions, gift, fail_forever=True)
    order_id = await make_order(
        sessions,
        [("l1", unique("SKU").upper(), 1, 2000)],
        [("t-gift", "gift_card", 1000, gift), ("t-card", "card", 1000, card)],
    )
    r = await alice.refund.submit_refund_for_approval(submit(order_id=order_id, amount=eur(1500)))
    await bob.refund.decide_refund_approval(approve(r.refund_id))
    faulted = await wait_state(bob, r.refund_id)
    assert faulted.state == R.STATE_FAULTED
    assert {t.tender_id: t.state for t in faulted.tenders} == {
        "t-card": TS.STATE_SUCCEEDED,
        "t-gift": TS.STATE_PENDING,
    }
    faults = await bob.refund.list_workflow_faults(
        refund_pb2.ListWorkflowFaultsRequest(refund_id=r.refund_id)
    )
    assert [(f.step, f.error_type, f.workflow_id) for f in faults.faults] == [
        ("tender:t-gift", "GatewayDeclined", f"refund-{r.refund_id}")
    ]
    assert "refund:faulted" in await history_codes(sessions, order_id)
    # A retry while it is not faulted any more is refused; a retry of a faulted one resumes.
    await configure(sessions, gift)
    retried = await bob.refund.retry_refund_execution(
        refund_pb2.RetryRefundExecutionRequest(refund_id=r.refund_id, request_id=unique("retry"))
    )
    assert retried.execution_attempt == 2
    assert retried.workflow_id == f"refund-{r.refund_id}-retry-1"
    done = await wait_state(bob, r.refund_id)
    assert done.state == R.STATE_COMPLETED
    card_tender = next(t for t in done.tenders if t.tender_id == "t-card")
    assert card_tender.attempts == 1  # never called again
    assert [p.amount_minor for p in await psp(sessions, card)] == [1000]
    assert [p.amount_minor for p in await psp(sessions, gift)] == [500]
    with pytest.raises(FailedPreconditionError) as exc:
        await bob.refund.retry_refund_execution(
            refund_pb2.RetryRefundExecutionRequest(refund_id=r.refund_id, request_id=unique("retry"))
        )
    assert exc.value.reason == "REFUND_NOT_FAULTED"
    open_faults = await bob.refund.list_workflow_faults(
        refund_pb2.ListWorkflowFaultsRequest(refund_id=r.refund_id)
    )
    assert list(open_faults.faults) == []
    order = await get_order(sessions, order_id)
    assert sum(p.refunded.amount_minor for p in order.payments) == 1500


async def test_histories_replay_deterministically(
    sessions: async_sessionmaker[AsyncSession],
    alice: Entrepot,
    bob: Entrepot,
    temporal_env: WorkflowEnvironment,
) -> None:
    gift, card = unique("gift"), unique("card")
    await configure(sessions, gift, fail_forever=True)
    await configure(sessions, card, fail_times=1)
    order_id = await make_order(
        sessions,
        [("l1", unique("SKU").upper(), 1, 2000)],
        [("t-gift", "gift_card", 1000, gift), ("t-card", "card", 1000, card)],
    )
    r = await alice.refund.submit_refund_for_approval(submit(order_id=order_id, amount=eur(2000)))
    await bob.refund.decide_refund_approval(approve(r.refund_id))
    assert (await wait_state(bob, r.refund_id)).state == R.STATE_FAULTED
    await configure(sessions, gift)
    await bob.refund.retry_refund_execution(
        refund_pb2.RetryRefundExecutionRequest(refund_id=r.refund_id, request_id=unique("retry"))
    )
    assert (await wait_state(bob, r.refund_id)).state == R.STATE_COMPLETED
    histories = []
    for wid in (refunds.workflow_id(r.refund_id, 1), refunds.workflow_id(r.refund_id, 2)):
        handle = temporal_env.client.get_workflow_handle(wid)
        await handle.result()
        histories.append(await handle.fetch_history())
    replayer = Replayer(workflows=[refunds.RefundExecutionWorkflow])
    for history in histories:
        result = await replayer.replay_workflow(history)
        assert result.replay_failure is None


async def test_gateway_timeout_after_charging_pays_once(
    sessions: async_sessionmaker[AsyncSession], alice: Entrepot, bob: Entrepot
) -> None:
    ref = unique("card")
    # The PSP pays, then the answer is lost: the retry must find the payment by its key.
    await configure(sessions, ref, timeout_after_charge_times=1, timeout_seconds=0.5)
    order_id = await make_order(
        sessions, [("l1", unique("SKU").upper(), 1, 1000)], [("t1", "card", 1000, ref)]
    )
    r = await alice.refund.submit_refund_for_approval(submit(order_id=order_id, amount=eur(1000)))
    await bob.refund.decide_refund_approval(approve(r.refund_id))
    done = await wait_state(bob, r.refund_id)
    assert done.state == R.STATE_COMPLETED
    assert done.tenders[0].attempts == 2
    paid = await psp(sessions, ref)
    assert len(paid) == 1 and paid[0].psp_refund_id == done.tenders[0].gateway_refund_id


async def test_inbox_filters_and_pages(
    sessions: async_sessionmaker[AsyncSession], alice: Entrepot, bob: Entrepot
) -> None:
    order_id = await make_order(
        sessions, [("l1", unique("SKU").upper(), 1, 1000)], [("t1", "card", 1000, unique("r"))]
    )
    made = [
        (await alice.refund.submit_refund_for_approval(submit(order_id=order_id, amount=eur(100)))).refund_id
        for _ in range(5)
    ]
    await bob.refund.decide_refund_approval(
        D(refund_id=made[0], decision=D.DECISION_DENY, note="duplicate", request_id=unique("d"))
    )
    seen: list[str] = []
    token = ""
    while True:
        page = await bob.refund.list_refund_requests(
            refund_pb2.ListRefundRequestsRequest(
                order_id=order_id, states=[R.STATE_PENDING_APPROVAL], page_size=2, page_token=token
            )
        )
        seen += [x.refund_id for x in page.refunds]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(made[1:]))  # newest first, the denied one filtered out
    with pytest.raises(InvalidArgumentError):
        await bob.refund.list_refund_requests(
            refund_pb2.ListRefundRequestsRequest(states=[R.STATE_UNSPECIFIED])
        )
