"""Error answers are bounded whatever the request carried (server/errors.py).

Every method of the served descriptors gets the worst inputs a caller can send: every text
field 100,000 characters long, every text field 2 KB of emoji (each non-ASCII byte is three
in grpc-message), and repeated fields with many such entries. The calls go through a DEFAULT
gRPC client (no raised metadata limits, which refuses trailers over 8 KiB as
RESOURCE_EXHAUSTED of its own), to a real server on loopback with a database of its own:
- no answer is UNKNOWN or INTERNAL, and none is the client's own RESOURCE_EXHAUSTED;
- the trailers (grpc-message percent-encoded, grpc-status-details-bin in base64, each entry
  counted as gRPC counts it, name + value + 32) stay under TRAILER_BUDGET.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from temporalio.testing import WorkflowEnvironment

import migrations
from server.app import App
from server.services import SERVICES
from tests import pg
from tests.conftest import TEST_CHANNEL, make_settings
from tests.procs import server_token
from tests.reliability.support import full_name, method_kwargs
from tests.reliability.test_fuzz import RESTORE_TEST_CHANNEL, _sql

METHODS: list[MethodDescriptor] = [m for spec in SERVICES for m in spec.descriptor.methods]
IDS = [f"{m.containing_service.name}.{m.name}" for m in METHODS]
TRAILER_BUDGET = 5 * 1024  # "well under" the default client's 8 KiB

LONG = "x" * 100_000
EMOJI = "\U0001f600" * 500  # 2,000 bytes of UTF-8
WORST = {"long": (LONG, 1, 1), "emoji": (EMOJI, 3, 40), "repeated": ("r" * 300, 3, 300)}


def worst_request(desc: Descriptor, text: str, depth: int, repeats: int) -> Message:
    """`desc` with every text field `text` (nested messages down to `depth`) and every
    repeated field `repeats` entries long."""
    msg = message_factory.GetMessageClass(desc)()
    for f in desc.fields:
        n = repeats if f.is_repeated else 1
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if f.message_type.GetOptions().map_entry:
                k, v = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
                if k.type == FieldDescriptor.TYPE_STRING and v.type == FieldDescriptor.TYPE_STRING:
                    for i in range(n):
                        getattr(msg, f.name)[f"{text}{i}"] = text
                continue
            if depth <= 0 or f.message_type.full_name.startswith("google.protobuf."):
                continue
            child = worst_request(f.message_type, text, depth - 1, repeats)
            if f.is_repeated:
                for _ in range(n):
                    getattr(msg, f.name).add().CopyFrom(child)
            else:
                getattr(msg, f.name).CopyFrom(child)
        elif f.type == FieldDescriptor.TYPE_STRING:
            if f.is_repeated:
                getattr(msg, f.name).extend(f"{text}{i}" for i in range(n))
            else:
                setattr(msg, f.name, text)
    return msg


def trailer_bytes(err: grpc.aio.AioRpcError) -> int:
    """The trailers' size as gRPC counts it: grpc-status, grpc-message (percent-encoded),
    grpc-status-details-bin (base64) and any other entry, each name + value + 32."""
    message = (err.details() or "").encode()
    encoded = sum(1 if 0x20 <= b < 0x7F and b != 0x25 else 3 for b in message)
    total = len("grpc-status") + 2 + 32 + len("grpc-message") + encoded + 32
    for key, value in err.trailing_metadata() or ():
        size = len(base64.b64encode(value)) if isinstance(value, bytes) else len(value)
        total += len(key) + size + 32
    return total


def server_detail(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for d in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if d.Unpack(info):
                    return info
    return None


def worst_fitting(desc: Descriptor, text: str, depth: int, repeats: int) -> Message:
    """worst_request, less deep until it fits well inside the server's 4 MiB message limit
    (a bigger request is refused for its size before any handler runs)."""
    while True:
        request = worst_request(desc, text, depth, repeats)
        if request.ByteSize() < 3 * 1024 * 1024 or depth == 0:
            return request
        depth -= 1


@pytest.fixture(scope="module")
def bounds_database() -> Iterator[str]:
    """A database of its own: the worst inputs may be accepted and stored."""
    url, name = pg.create_database("entrepot_bounds")
    migrations.upgrade(url)
    asyncio.run(_sql(url, RESTORE_TEST_CHANNEL))
    yield url
    pg.drop_database(name)


@pytest.fixture(scope="module")
async def bounds_target(bounds_database: str, temporal_env: WorkflowEnvironment) -> AsyncIterator[str]:
    temporal = temporal_env.client.service_client.config.target_host
    app = App(make_settings(bounds_database, temporal, channel_cache_seconds=0))
    await app.start()
    try:
        yield f"127.0.0.1:{app.port}"
    finally:
        await app.stop(grace=0.5)


async def call(
    channel: grpc.aio.Channel, method: MethodDescriptor, request: Message
) -> grpc.aio.AioRpcError | None:
    """One call of any shape; a stream is read for one message at most. None: no error."""
    md = [("authorization", f"Bearer {server_token('bounds')}"), ("x-channel-slug", TEST_CHANNEL)]
    name, kw = full_name(method), method_kwargs(method)
    try:
        if method.client_streaming and method.server_streaming:
            stream: Any = channel.stream_stream(name, **kw)(iter([request]), metadata=md, timeout=10)
        elif method.client_streaming:
            await channel.stream_unary(name, **kw)(iter([request]), metadata=md, timeout=10)
            return None
        elif method.server_streaming:
            stream = channel.unary_stream(name, **kw)(request, metadata=md, timeout=10)
        else:
            await channel.unary_unary(name, **kw)(request, metadata=md, timeout=10)
            return None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):
                async for _ in stream:
                    break
        stream.cancel()
        return None
    except grpc.aio.AioRpcError as err:
        return err


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", METHODS, ids=IDS)
async def test_worst_inputs_get_bounded_errors_through_a_default_client(
    bounds_target: str, method: MethodDescriptor
) -> None:
    async with grpc.aio.insecure_channel(bounds_target) as channel:  # default options on purpose
        for variant, (text, depth, repeats) in WORST.items():
            request = worst_fitting(method.input_type, text, depth, repeats)
            err = await call(channel, method, request)
            if err is None:
                continue
            code = err.code()
            what = f"{variant}: {code.name} {(err.details() or '')[:300]!r}"
            assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), what
            assert "metadata size" not in (err.details() or ""), what  # the client's own refusal
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert server_detail(err) is not None, f"not the server's answer: {what}"
            size = trailer_bytes(err)
            assert size < TRAILER_BUDGET, f"{variant}: {size} bytes of trailers ({what})"


async def test_an_echoed_value_is_cut_to_a_prefix_with_its_length(bounds_target: str) -> None:
    from entrepot.platform.v1 import channel_pb2, channel_pb2_grpc

    async with grpc.aio.insecure_channel(bounds_target) as channel:
        stub = channel_pb2_grpc.ChannelServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetChannel(
                channel_pb2.GetChannelRequest(slug=LONG),
                metadata=[("authorization", f"Bearer {server_token('bounds')}")],
                timeout=10,
            )
    err = caught.value
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "xxxxxxxx…" in (err.details() or ""), err.details()
    assert "(100000 chars)" in (err.details() or ""), err.details()
    assert len(err.details() or "") < 200
    assert trailer_bytes(err) < 1024
