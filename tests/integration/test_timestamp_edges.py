"""Timestamps at the edges of google.protobuf.Timestamp's range (server/convert.py, the one
conversion for every service): the first and last valid instants are accepted and come back
as sent (to the microsecond, PostgreSQL's precision), values outside the range are
INVALID_ARGUMENT with a field violation naming the field; nothing is INTERNAL.

Every RPC whose request carries a Timestamp, found from the descriptors, gets both ends and
the invalid values; the fields the server reads also go through a full, valid request."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from entrepot.inventory.v1 import inventory_pb2 as inv
from entrepot.order.v1 import order_pb2 as opb
from entrepot.registration.v1 import registration_pb2 as rpb
from entrepot_client import Entrepot, InvalidArgumentError
from server.services import SERVICES
from tests.conftest import TEST_CHANNEL, unique
from tests.integration.test_order_api import intent, submit
from tests.integration.test_registration_grpc import make_form, rid
from tests.procs import server_token
from tests.reliability.support import full_name, method_kwargs

FIRST = (-62_135_596_800, 0)  # 0001-01-01T00:00:00Z
LAST = (253_402_300_799, 999_999_999)  # 9999-12-31T23:59:59.999999999Z
LAST_STORED = (253_402_300_799, 999_999_000)  # to the microsecond
INVALID = [
    (-62_135_596_801, 0),  # before year 1
    (253_402_300_800, 0),  # after year 9999
    (2**62, 0),
    (-(2**62), 0),
    (1_700_000_000, -1),
    (1_700_000_000, 1_000_000_000),
]


def timestamp_paths(desc: Descriptor, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, ...]]:
    """The path (field names) of every Timestamp field in `desc`, nested messages included."""
    for f in desc.fields:
        if f.message_type is None or f.message_type.GetOptions().map_entry:
            continue
        if f.message_type.full_name == "google.protobuf.Timestamp":
            yield (f.name,)
        elif depth < 4 and not f.message_type.full_name.startswith("google."):
            for rest in timestamp_paths(f.message_type, prefix, depth + 1):
                yield (f.name, *rest)


CASES = [
    (m, path) for spec in SERVICES for m in spec.descriptor.methods for path in timestamp_paths(m.input_type)
]


def with_timestamp(method: MethodDescriptor, path: tuple[str, ...], value: tuple[int, int]) -> Message:
    request = message_factory.GetMessageClass(method.input_type)()
    msg: Any = request
    for name in path[:-1]:
        field = msg.DESCRIPTOR.fields_by_name[name]
        msg = getattr(msg, name).add() if field.is_repeated else getattr(msg, name)
    getattr(msg, path[-1]).CopyFrom(Timestamp(seconds=value[0], nanos=value[1]))
    return request


async def send(target: str, method: MethodDescriptor, request: Message) -> grpc.aio.AioRpcError | None:
    md = [("authorization", f"Bearer {server_token('timestamps')}"), ("x-channel-slug", TEST_CHANNEL)]
    name, kw = full_name(method), method_kwargs(method)
    async with grpc.aio.insecure_channel(target) as ch:
        try:
            if method.client_streaming:
                await ch.stream_unary(name, **kw)(iter([request]), metadata=md, timeout=10)
            elif method.server_streaming:
                call = ch.unary_stream(name, **kw)(request, metadata=md, timeout=2)
                async for _ in call:
                    break
                call.cancel()
            else:
                await ch.unary_unary(name, **kw)(request, metadata=md, timeout=10)
        except grpc.aio.AioRpcError as err:
            return err
    return None


def test_the_enumeration_finds_the_fields_the_server_reads() -> None:
    found = {f"{m.name}:{'.'.join(p)}" for m, p in CASES}
    assert {
        "CreateInvitationCode:invitation_code.expire_time",
        "SubmitOrderIntent:intent.submit_time",
        "AppendOrderStatus:entry.record_time",
        "ListOrders:start_time",
        "ListStockMovements:end_time",
        "SyncStock:batch.events.occurred_at",
    } <= found


@pytest.mark.parametrize(("method", "path"), CASES, ids=[f"{m.name}:{'.'.join(p)}" for m, p in CASES])
async def test_every_timestamp_in_a_request_is_accepted_or_refused_clearly(
    target: str, test_channel: str, method: MethodDescriptor, path: tuple[str, ...]
) -> None:
    for value in (FIRST, LAST, *INVALID):
        err = await send(target, method, with_timestamp(method, path, value))
        if err is None:
            continue
        assert err.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (value, err)
        if value in (FIRST, LAST):
            assert "timestamp" not in (err.details() or "").lower(), (value, err.details())


def ts(value: tuple[int, int]) -> Timestamp:
    return Timestamp(seconds=value[0], nanos=value[1])


def stored(value: tuple[int, int]) -> tuple[int, int]:
    return value if value != LAST else LAST_STORED


def pair(t: Timestamp) -> tuple[int, int]:
    return (t.seconds, t.nanos)


async def refused(call: Any, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        await call
    assert err.value.reason == "INVALID_TIMESTAMP", err.value
    assert [v.field for v in err.value.field_violations] == [field]


async def test_invitation_code_expire_time_round_trips_at_both_ends(admin: Entrepot) -> None:
    form = await make_form(admin, invitation=True)

    def create(value: tuple[int, int]) -> Any:
        code = rpb.InvitationCode(code=unique("EDGE"), form_id=form.id, max_uses=1, active=True)
        code.expire_time.CopyFrom(ts(value))
        return admin.registration.create_invitation_code(
            rpb.CreateInvitationCodeRequest(invitation_code=code, request_id=rid())
        )

    for value in (FIRST, LAST):
        created = await create(value)
        assert pair(created.expire_time) == stored(value)
        again = await admin.registration.get_invitation_code(rpb.GetInvitationCodeRequest(code=created.code))
        assert pair(again.expire_time) == stored(value)
    for value in INVALID:
        await refused(create(value), "invitation_code.expire_time")


async def test_order_times_round_trip_at_both_ends(
    admin: Entrepot, client_factory: Callable[..., Entrepot]
) -> None:
    writer = client_factory(permissions=["*"], status_namespaces=["edge"])
    for value in (FIRST, LAST):
        i = intent()
        i.submit_time.CopyFrom(ts(value))
        order = (await submit(admin, i)).order
        assert pair(order.submit_time) == stored(value)
        entry = await writer.order.append_order_status(
            opb.AppendOrderStatusRequest(
                entry=opb.OrderStatusEntry(order_id=order.id, code="edge:note", record_time=ts(value)),
                request_id=unique("rid"),
            )
        )
        assert pair(entry.record_time) == stored(value)
    order = (await submit(admin, intent())).order
    for value in INVALID:
        bad = intent()
        bad.submit_time.CopyFrom(ts(value))
        await refused(submit(admin, bad), "intent.submit_time")
        await refused(
            writer.order.append_order_status(
                opb.AppendOrderStatusRequest(
                    entry=opb.OrderStatusEntry(order_id=order.id, code="edge:note", record_time=ts(value))
                )
            ),
            "entry.record_time",
        )


async def test_list_filters_take_both_ends(admin: Entrepot) -> None:
    await submit(admin, intent())
    everything = await admin.order.list_orders(
        opb.ListOrdersRequest(start_time=ts(FIRST), end_time=ts(LAST), page_size=1)
    )
    assert len(everything.orders) == 1
    await admin.inventory.list_stock_movements(
        inv.ListStockMovementsRequest(start_time=ts(FIRST), end_time=ts(LAST), page_size=1)
    )
    for value in INVALID:
        await refused(admin.order.list_orders(opb.ListOrdersRequest(start_time=ts(value))), "start_time")
        await refused(
            admin.inventory.list_stock_movements(inv.ListStockMovementsRequest(end_time=ts(value))),
            "end_time",
        )
