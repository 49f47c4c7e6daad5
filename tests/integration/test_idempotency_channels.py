"""An idempotent replay never crosses a channel: the same subject, request_id and
body sent on another channel is REQUEST_ID_REUSED, never the other channel's answer.

Every mutating channel-scoped RPC is enumerated from the served descriptors, so a
new RPC cannot escape."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from entrepot.cart.v1 import cart_pb2
from entrepot.platform.v1 import channel_pb2, types_pb2
from entrepot.registration.v1 import registration_pb2
from entrepot_client import AlreadyExistsError, Entrepot
from server.auth import policies_for
from server.services import SERVICES
from tests.conftest import unique
from tests.integration.test_inventory_api import make_item, make_warehouse, reserve
from tests.integration.test_registration_grpc import steps

POLICIES = policies_for([spec.descriptor for spec in SERVICES])
MUTATING_CHANNEL_METHODS: list[tuple[str, MethodDescriptor]] = [
    (f"/{spec.descriptor.full_name}/{m.name}", m)
    for spec in SERVICES
    for m in spec.descriptor.methods
    if POLICIES[f"/{spec.descriptor.full_name}/{m.name}"].channel_required
    and "request_id" in m.input_type.fields_by_name
    and not m.client_streaming
    and not m.server_streaming
]


def test_the_enumeration_finds_the_mutating_channel_rpcs() -> None:
    names = {name.rsplit("/", 1)[-1] for name, _ in MUTATING_CHANNEL_METHODS}
    # The calls that leaked before (issue: "An idempotent replay never crosses a channel").
    assert {
        "SubmitOrderIntent",
        "CreateCart",
        "SetPurchaseLimit",
        "SubmitRefundForApproval",
        "CreateRegistrationForm",
        "CreateInvitationCode",
        "SubmitRegistration",
    } <= names


async def _channel(admin: Entrepot) -> str:
    slug = unique("idem")
    await admin.channel.create_channel(
        channel_pb2.CreateChannelRequest(channel=channel_pb2.Channel(slug=slug, name=slug, currency="EUR"))
    )
    return slug


Outcome = tuple[grpc.StatusCode, bytes]  # (code, response bytes or grpc-status-details-bin)


async def _call(target: str, name: str, method: MethodDescriptor, request: Message, md: list[Any]) -> Outcome:
    resp_cls = message_factory.GetMessageClass(method.output_type)
    async with grpc.aio.insecure_channel(target) as ch:
        call = ch.unary_unary(
            name,
            request_serializer=type(request).SerializeToString,
            response_deserializer=resp_cls.FromString,
        )
        try:
            response = await call(request, metadata=md, timeout=10)
        except grpc.aio.AioRpcError as err:
            details = dict(err.trailing_metadata() or ()).get("grpc-status-details-bin", b"")
            return err.code(), bytes(details) if isinstance(details, bytes) else details.encode()
    return grpc.StatusCode.OK, response.SerializeToString()


def _reason(details: bytes) -> str:
    status = status_pb2.Status.FromString(details)
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            return info.reason
    return ""


async def _stored(sessions: async_sessionmaker[AsyncSession], sub: str, request_id: str) -> bool:
    async with sessions() as s:
        row = await s.execute(
            text("SELECT 1 FROM platform.idempotency_keys WHERE principal = :p AND request_id = :r"),
            {"p": sub, "r": request_id},
        )
        return row.first() is not None


@pytest.mark.parametrize(
    ("name", "method"),
    MUTATING_CHANNEL_METHODS,
    ids=[n.rsplit("/", 1)[-1] for n, _ in MUTATING_CHANNEL_METHODS],
)
async def test_a_replay_on_another_channel_never_returns_the_first_channels_answer(
    admin: Entrepot,
    target: str,
    make_token: Callable[..., str],
    sessions: async_sessionmaker[AsyncSession],
    name: str,
    method: MethodDescriptor,
) -> None:
    a, b = await _channel(admin), await _channel(admin)
    sub = unique("subject")
    request_id = uuid.uuid4().hex
    request = message_factory.GetMessageClass(method.input_type)(request_id=request_id)

    def md(channel: str) -> list[tuple[str, str]]:
        return [
            ("authorization", f"Bearer {make_token(channels=[channel], sub=sub)}"),
            ("x-channel-slug", channel),
        ]

    on_b = await _call(target, name, method, request, md(b))
    stored = await _stored(sessions, sub, request_id)
    on_a = await _call(target, name, method, request, md(a))
    if stored:
        assert on_a[0] == grpc.StatusCode.ALREADY_EXISTS and _reason(on_a[1]) == "REQUEST_ID_REUSED", on_a
    else:
        # Refused before anything was stored (the request itself is malformed): A gets
        # what A gets for the same request under a request_id never used.
        fresh = message_factory.GetMessageClass(method.input_type)(request_id=uuid.uuid4().hex)
        on_a_fresh = await _call(target, name, method, fresh, md(a))
        assert on_a[0] == on_a_fresh[0] != grpc.StatusCode.OK
    # On its own channel the stored answer is replayed, as before.
    assert await _call(target, name, method, request, md(b)) == on_b


async def test_the_answers_that_leaked_now_stay_on_their_channel(
    admin: Entrepot, client_factory: Callable[..., Entrepot], sessions: async_sessionmaker[AsyncSession]
) -> None:
    """The issue's table with real bodies: B creates objects, A replays them."""
    a, b = await _channel(admin), await _channel(admin)
    sub = unique("subject")
    on_a = client_factory(channels=[a], channel=a, sub=sub)
    on_b = client_factory(channels=[b], channel=b, sub=sub)

    cart = cart_pb2.CreateCartRequest(
        request_id=uuid.uuid4().hex,
        cart=cart_pb2.Cart(
            customer_ref=unique("cust"),
            lines=[
                cart_pb2.CartLine(
                    sku=unique("SKU"),
                    quantity=1,
                    unit_price=types_pb2.Money(currency_code="EUR", amount_minor=100),
                )
            ],
        ),
    )
    form = registration_pb2.CreateRegistrationFormRequest(
        request_id=uuid.uuid4().hex,
        form=registration_pb2.RegistrationForm(
            slug=unique("form"), name="Wholesale", active=True, steps=steps()
        ),
    )
    created_cart = await on_b.cart.create_cart(cart)
    created_form = await on_b.registration.create_registration_form(form)

    with pytest.raises(AlreadyExistsError) as cart_err:
        await on_a.cart.create_cart(cart)
    assert cart_err.value.reason == "REQUEST_ID_REUSED"
    with pytest.raises(AlreadyExistsError) as form_err:
        await on_a.registration.create_registration_form(form)
    assert form_err.value.reason == "REQUEST_ID_REUSED"

    # The owner still gets its answer back, once.
    assert (await on_b.cart.create_cart(cart)).id == created_cart.id
    assert (await on_b.registration.create_registration_form(form)).id == created_form.id
    async with sessions() as s:
        carts = await s.execute(
            text("SELECT count(*) FROM carts.carts WHERE customer_ref = :c"), {"c": cart.cart.customer_ref}
        )
        assert carts.scalar_one() == 1


async def test_a_batched_reservation_replay_is_bound_to_its_channel(
    admin: Entrepot, client_factory: Callable[..., Entrepot]
) -> None:
    """ReserveStock is not channel-scoped, but a call bound to a channel (x-channel-slug)
    is replayed only on that channel: the batcher uses the same rule."""
    a, b = await _channel(admin), await _channel(admin)
    sub = unique("subject")
    wh = await make_warehouse(admin)
    sku = await make_item(admin, {wh: 5})
    request = reserve(sku, 1, rid=uuid.uuid4().hex)
    on_b = client_factory(channels=[b], channel=b, sub=sub)
    first = await on_b.inventory.reserve_stock(request)
    with pytest.raises(AlreadyExistsError) as err:
        await client_factory(channels=[a], channel=a, sub=sub).inventory.reserve_stock(request)
    assert err.value.reason == "REQUEST_ID_REUSED"
    assert (await on_b.inventory.reserve_stock(request)).id == first.id


async def test_answers_stored_before_channels_were_hashed_are_never_replayed_on_a_channel(
    admin: Entrepot, client_factory: Callable[..., Entrepot], sessions: async_sessionmaker[AsyncSession]
) -> None:
    """A key written by the previous server (its hash covered method and body only)
    is REQUEST_ID_REUSED for a channel-bound call on any channel: it cannot be told
    which channel it was made on."""
    a, b = await _channel(admin), await _channel(admin)
    sub = unique("subject")
    request = cart_pb2.CreateCartRequest(
        request_id=uuid.uuid4().hex, cart=cart_pb2.Cart(customer_ref=unique("c"))
    )
    await client_factory(channels=[b], channel=b, sub=sub).cart.create_cart(request)
    legacy = hashlib.sha256(
        b"/entrepot.cart.v1.CartService/CreateCart\0" + request.SerializeToString(deterministic=True)
    )
    async with sessions() as s, s.begin():
        await s.execute(
            text(
                "UPDATE platform.idempotency_keys SET request_hash = :h WHERE principal = :p AND request_id = :r"
            ),
            {"h": legacy.digest(), "p": sub, "r": request.request_id},
        )
    for channel in (a, b):
        with pytest.raises(AlreadyExistsError) as err:
            await client_factory(channels=[channel], channel=channel, sub=sub).cart.create_cart(request)
        assert err.value.reason == "REQUEST_ID_REUSED"
