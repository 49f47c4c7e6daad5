"""x-channel-slug must name an active channel listed in the token."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from entrepot.platform.v1 import channel_pb2
from entrepot_client import Entrepot, FailedPreconditionError, NotFoundError, PermissionDeniedError
from tests.conftest import unique


async def _make_channel(admin: Entrepot, active: bool = True) -> str:
    slug = unique("bind")
    await admin.channel.create_channel(
        channel_pb2.CreateChannelRequest(channel=channel_pb2.Channel(slug=slug, name=slug, currency="EUR"))
    )
    if not active:
        await admin.channel.update_channel(
            channel_pb2.UpdateChannelRequest(
                channel=channel_pb2.Channel(slug=slug, active=False), update_mask={"paths": ["active"]}
            )
        )
    return slug


async def test_listed_active_channel_reaches_the_service(
    admin: Entrepot, client_factory: Callable[..., Entrepot]
) -> None:
    slug = await _make_channel(admin)
    c = client_factory(channels=[slug], channel=slug)
    got = await c.channel.get_channel(channel_pb2.GetChannelRequest(slug=slug))
    assert got.slug == slug


async def test_unknown_channel_is_not_found(client_factory: Callable[..., Entrepot]) -> None:
    c = client_factory(channel="no-such-" + unique())
    with pytest.raises(NotFoundError) as exc:
        await c.channel.list_channels(channel_pb2.ListChannelsRequest())
    assert exc.value.reason == "CHANNEL_NOT_FOUND"


async def test_inactive_channel_is_failed_precondition(
    admin: Entrepot, client_factory: Callable[..., Entrepot]
) -> None:
    slug = await _make_channel(admin, active=False)
    c = client_factory(channel=slug)
    with pytest.raises(FailedPreconditionError) as exc:
        await c.channel.list_channels(channel_pb2.ListChannelsRequest())
    assert exc.value.reason == "CHANNEL_INACTIVE"


async def test_channel_not_in_token_is_denied_even_if_it_exists(
    admin: Entrepot, client_factory: Callable[..., Entrepot]
) -> None:
    slug = await _make_channel(admin)
    c = client_factory(channels=["another"], channel=slug)
    with pytest.raises(PermissionDeniedError) as exc:
        await c.channel.list_channels(channel_pb2.ListChannelsRequest())
    assert exc.value.reason == "CHANNEL_NOT_ALLOWED"


async def test_deactivation_takes_effect_on_this_replica_at_once(
    admin: Entrepot, client_factory: Callable[..., Entrepot]
) -> None:
    slug = await _make_channel(admin)
    c = client_factory(channel=slug)
    await c.channel.list_channels(channel_pb2.ListChannelsRequest())  # cached as active
    await admin.channel.update_channel(
        channel_pb2.UpdateChannelRequest(
            channel=channel_pb2.Channel(slug=slug, active=False), update_mask={"paths": ["active"]}
        )
    )
    with pytest.raises(FailedPreconditionError):
        await c.channel.list_channels(channel_pb2.ListChannelsRequest())
