"""The foundation from a client's side: health, channels, idempotency, error details."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from entrepot.platform.v1 import channel_pb2
from entrepot_client import AlreadyExistsError, InvalidArgumentError, NotFoundError
from tests.conftest import unique


async def test_health_reports_serving(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "entrepot.database", "entrepot.temporal", "entrepot.platform.v1.ChannelService"):
            r = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_create_get_list_update_channel(admin) -> None:
    slug = unique("ch")
    created = await admin.channel.create_channel(
        channel_pb2.CreateChannelRequest(
            channel=channel_pb2.Channel(slug=slug, name="Web FR", currency="EUR", timezone="Europe/Paris")
        )
    )
    assert created.active and created.currency == "EUR"
    got = await admin.channel.get_channel(channel_pb2.GetChannelRequest(slug=slug))
    assert got.name == "Web FR"
    updated = await admin.channel.update_channel(
        channel_pb2.UpdateChannelRequest(
            channel=channel_pb2.Channel(slug=slug, name="Web France"),
            update_mask={"paths": ["name"]},
        )
    )
    assert updated.name == "Web France" and updated.currency == "EUR" and updated.timezone == "Europe/Paris"


async def test_invalid_channel_reports_every_field(admin) -> None:
    with pytest.raises(InvalidArgumentError) as exc:
        await admin.channel.create_channel(
            channel_pb2.CreateChannelRequest(
                channel=channel_pb2.Channel(
                    slug="Bad Slug", name="", currency="EURO", timezone="Mars/Olympus"
                )
            )
        )
    fields = {v.field for v in exc.value.field_violations}
    assert fields == {"channel.slug", "channel.name", "channel.currency", "channel.timezone"}
    assert exc.value.reason == "INVALID_ARGUMENT" and exc.value.domain == "entrepot"


async def test_unknown_channel_is_not_found(admin) -> None:
    with pytest.raises(NotFoundError) as exc:
        await admin.channel.get_channel(channel_pb2.GetChannelRequest(slug="nope-" + unique()))
    assert exc.value.reason == "CHANNEL_NOT_FOUND"


async def test_pagination_walks_every_channel_once(admin) -> None:
    prefix = unique("pg")
    slugs = {f"{prefix}-{i:02d}" for i in range(7)}
    for slug in slugs:
        await admin.channel.create_channel(
            channel_pb2.CreateChannelRequest(
                channel=channel_pb2.Channel(slug=slug, name=slug, currency="EUR")
            )
        )
    seen: list[str] = []
    token = ""
    while True:
        page = await admin.channel.list_channels(
            channel_pb2.ListChannelsRequest(page_size=3, page_token=token)
        )
        assert len(page.channels) <= 3
        seen += [c.slug for c in page.channels]
        token = page.next_page_token
        if not token:
            break
    assert slugs <= set(seen) and len(seen) == len(set(seen))


async def test_page_token_for_other_filters_is_refused(admin) -> None:
    with pytest.raises(InvalidArgumentError) as exc:
        await admin.channel.list_channels(channel_pb2.ListChannelsRequest(page_token="garbage!"))
    assert exc.value.reason == "INVALID_PAGE_TOKEN"


async def test_idempotent_replay_50_concurrent_identical_calls(admin, sessions) -> None:
    """R2: one effect, identical responses; same id + other body: ALREADY_EXISTS."""
    slug = unique("idem")
    request = channel_pb2.CreateChannelRequest(
        channel=channel_pb2.Channel(slug=slug, name="Idem", currency="EUR"), request_id=unique("rid")
    )
    results = await asyncio.gather(*(admin.channel.create_channel(request) for _ in range(50)))
    assert all(r == results[0] for r in results)
    from sqlalchemy import text

    async with sessions() as s:
        events = (
            await s.execute(
                text(
                    "SELECT count(*) FROM platform.outbox WHERE topic = 'channel.created' AND aggregate_id = :s"
                ),
                {"s": slug},
            )
        ).scalar_one()
    assert events == 1

    other = channel_pb2.CreateChannelRequest(
        channel=channel_pb2.Channel(slug=slug + "x", name="Other", currency="EUR"),
        request_id=request.request_id,
    )
    with pytest.raises(AlreadyExistsError) as exc:
        await admin.channel.create_channel(other)
    assert exc.value.reason == "REQUEST_ID_REUSED"


async def test_idempotent_replay_of_an_error(admin) -> None:
    """The first answer, an error included, is the answer for that request_id."""
    slug = unique("dup")
    await admin.channel.create_channel(
        channel_pb2.CreateChannelRequest(channel=channel_pb2.Channel(slug=slug, name="A", currency="EUR"))
    )
    again = channel_pb2.CreateChannelRequest(
        channel=channel_pb2.Channel(slug=slug, name="A", currency="EUR"), request_id=unique("rid")
    )
    for _ in range(2):
        with pytest.raises(AlreadyExistsError) as exc:
            await admin.channel.create_channel(again)
        assert exc.value.reason == "CHANNEL_EXISTS"


async def test_driver_connection_follows_the_session_transaction(sessions) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    from domain.shared.db import driver_connection

    xid = "SELECT pg_current_xact_id()::text"
    seen: list[str] = []
    async with sessions() as s:
        for _ in range(3):  # one session, several transactions one after the other
            await s.begin()
            first = await driver_connection(s)
            assert await driver_connection(s) is first
            on_driver = await first.fetchval(xid)
            assert on_driver == (await s.execute(text(xid))).scalar_one()
            seen.append(on_driver)
            await s.rollback()
    assert len(set(seen)) == 3
