"""The metadata limit is exact (server/app.py sets gRPC's soft and hard limit to
ENTREPOT_MAX_METADATA_BYTES): a request whose header list is over the limit is
RESOURCE_EXHAUSTED every time, one at or under it is accepted every time.

gRPC counts a header list as HPACK does: for each entry, name + value + 32, pseudo-headers
(:path, :authority, ...) and the headers the client adds (user-agent, te, ...) included.
The test computes that size for each request and pads it to the byte.
"""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.reliability.test_limits import serving

LIMIT = 16 * 1024  # the default of Settings.max_metadata_bytes
TRIES = 30
CHECK = "/grpc.health.v1.Health/Check"


async def user_agent() -> str:
    """The user-agent this client sends, as a server sees it."""
    seen: list[str] = []

    class Echo(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                seen.extend(v for k, v in context.invocation_metadata() or () if k == "user-agent")
                return b""

            return grpc.unary_unary_rpc_method_handler(handle)

    server = grpc.aio.server(handlers=[Echo()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            await ch.unary_unary(CHECK)(b"")
    finally:
        await server.stop(0)
    return seen[0]


def header_list_size(target: str, agent: str, extra: list[tuple[str, str]]) -> int:
    """What the server counts for a unary call without a deadline from this client."""
    entries = [
        (":path", CHECK),
        (":authority", target),
        (":method", "POST"),
        (":scheme", "http"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("user-agent", agent),
        ("grpc-accept-encoding", "identity, deflate, gzip"),
        *extra,
    ]
    return sum(len(k) + len(v) + 32 for k, v in entries)


async def test_metadata_limit_is_exact(database_url: str) -> None:
    agent = await user_agent()
    async with serving(database_url) as app:
        assert app.settings.max_metadata_bytes == LIMIT
        target = f"127.0.0.1:{app.port}"
        base = header_list_size(target, agent, [("x-pad", "")])

        async with grpc.aio.insecure_channel(target) as ch:  # a default client
            stub = health_pb2_grpc.HealthStub(ch)

            async def accepted(total: int) -> int:
                """How many of TRIES calls with a header list of `total` bytes were let in."""
                pad = [("x-pad", "p" * (total - base))]
                assert header_list_size(target, agent, pad) == total
                n = 0
                for _ in range(TRIES):
                    try:
                        await stub.Check(health_pb2.HealthCheckRequest(), metadata=pad)
                        n += 1
                    except grpc.aio.AioRpcError as err:
                        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                return n

            counts = {total: await accepted(total) for total in (LIMIT - 1, LIMIT, LIMIT + 1, 2 * LIMIT)}
    assert counts == {LIMIT - 1: TRIES, LIMIT: TRIES, LIMIT + 1: 0, 2 * LIMIT: 0}, counts


@pytest.mark.parametrize("limit", [8 * 1024, 32 * 1024])
async def test_the_setting_moves_the_limit(database_url: str, limit: int) -> None:
    agent = await user_agent()
    async with serving(database_url, max_metadata_bytes=limit) as app:
        target = f"127.0.0.1:{app.port}"
        base = header_list_size(target, agent, [("x-pad", "")])
        async with grpc.aio.insecure_channel(target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            await stub.Check(health_pb2.HealthCheckRequest(), metadata=[("x-pad", "p" * (limit - base))])
            for _ in range(10):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Check(
                        health_pb2.HealthCheckRequest(), metadata=[("x-pad", "p" * (limit + 1 - base))]
                    )
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
