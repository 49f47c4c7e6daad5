"""ChannelService servicer."""

from __future__ import annotations

import grpc

from domain.platform import channels
from domain.shared.uow import UnitOfWork
from entrepot.platform.v1 import channel_pb2, channel_pb2_grpc
from server.convert import mask_paths, ts
from server.runtime import Runtime


def channel_to_proto(c: channels.Channel) -> channel_pb2.Channel:
    return channel_pb2.Channel(
        slug=c.slug,
        name=c.name,
        currency=c.currency,
        timezone=c.timezone,
        active=c.active,
        create_time=ts(c.created_at),
        update_time=ts(c.updated_at),
    )


class ChannelServicer(channel_pb2_grpc.ChannelServiceServicer):
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def CreateChannel(
        self, request: channel_pb2.CreateChannelRequest, context: grpc.aio.ServicerContext
    ) -> channel_pb2.Channel:
        c = request.channel

        async def run(uow: UnitOfWork) -> channel_pb2.Channel:
            created = await channels.create_channel(
                uow.session, slug=c.slug, name=c.name, currency=c.currency, timezone=c.timezone or "UTC"
            )
            return channel_to_proto(created)

        return await self.rt.mutate(request, run)

    async def GetChannel(
        self, request: channel_pb2.GetChannelRequest, context: grpc.aio.ServicerContext
    ) -> channel_pb2.Channel:
        return channel_to_proto(await self.rt.read(lambda s: channels.get_channel(s, request.slug)))

    async def ListChannels(
        self, request: channel_pb2.ListChannelsRequest, context: grpc.aio.ServicerContext
    ) -> channel_pb2.ListChannelsResponse:
        found, token = await self.rt.read(
            lambda s: channels.list_channels(s, size=request.page_size, token=request.page_token)
        )
        return channel_pb2.ListChannelsResponse(
            channels=[channel_to_proto(c) for c in found], next_page_token=token
        )

    async def UpdateChannel(
        self, request: channel_pb2.UpdateChannelRequest, context: grpc.aio.ServicerContext
    ) -> channel_pb2.Channel:
        c = request.channel

        async def run(uow: UnitOfWork) -> channel_pb2.Channel:
            updated = await channels.update_channel(
                uow.session,
                slug=c.slug,
                fields=mask_paths(request.update_mask, "channel"),
                name=c.name,
                currency=c.currency,
                timezone=c.timezone,
                active=c.active,
            )
            return channel_to_proto(updated)

        result = await self.rt.mutate(request, run)
        self.rt.channel_changed(c.slug)
        return result
