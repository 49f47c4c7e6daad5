"""R8: bad input never hurts. For EVERY method in the served descriptors (a new RPC is fuzzed
without anyone writing a line), hypothesis generates requests from the message descriptors
(tests/reliability/strategies.py) and sends them to a real server process with a token that has
every permission, on the `test` channel:
- no answer is UNKNOWN or INTERNAL (bad input is a clear INVALID_ARGUMENT / NOT_FOUND / ...);
- the process never dies and stays SERVING;
- a message over the size limit and oversized metadata are RESOURCE_EXHAUSTED for every method.

Short in CI; `ENTREPOT_SOAK=long` (make soak) runs many more examples per method.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import text_format
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from temporalio.testing import WorkflowEnvironment

import migrations
from server.services import SERVICES
from tests import pg
from tests.conftest import TEST_CHANNEL
from tests.procs import ServerProcess, server_token
from tests.reliability.strategies import messages
from tests.reliability.support import LONG, call_sync, full_name, method_kwargs, soak

METHODS: list[MethodDescriptor] = [m for spec in SERVICES for m in spec.descriptor.methods]
IDS = [f"{m.containing_service.name}.{m.name}" for m in METHODS]
BAD = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
MAX_MESSAGE_BYTES = 256 * 1024


@pytest.fixture(scope="module")
def fuzz_database() -> Iterator[str]:
    """A database of its own: generated calls may update or deactivate anything they can name
    (the `test` channel included), which must not leak into the other tests of the session."""
    url, name = pg.create_database("entrepot_fuzz")
    migrations.upgrade(url)
    asyncio.run(_sql(url, RESTORE_TEST_CHANNEL))
    yield url
    pg.drop_database(name)


RESTORE_TEST_CHANNEL = f"""
INSERT INTO platform.channels (slug, name, currency, timezone, active)
VALUES ('{TEST_CHANNEL}', 'Test', 'EUR', 'Europe/Paris', true)
ON CONFLICT (slug) DO UPDATE SET name = 'Test', currency = 'EUR', timezone = 'Europe/Paris', active = true
"""


async def _sql(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def fuzz_server(
    fuzz_database: str, temporal_env: WorkflowEnvironment, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    target_host = temporal_env.client.service_client.config.target_host
    server = ServerProcess(
        fuzz_database,
        tmp_path_factory.mktemp("fuzz"),
        temporal_address=target_host,
        ENTREPOT_LOG_LEVEL="ERROR",
        # The test channel is restored between methods; the server must see that at once.
        ENTREPOT_CHANNEL_CACHE_SECONDS="0",
        # Smaller than the 4 MiB default so that sending an oversized message to every method
        # stays cheap; generated requests are far below it.
        ENTREPOT_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES),
    )
    with server:
        _seed(server.target)
        yield server
        assert server.alive(), f"the server died during the fuzz run:\n{server.log_tail()}"


SEED_WAREHOUSE = "PAR"
SEED_SKUS = ("MUG-1", "mug-1", "caf\u00e9")


def _seed(target: str) -> None:
    """Stock the generated requests can hit: names that are also in the strategies' tricky strings."""
    from entrepot.inventory.v1 import inventory_pb2 as inv
    from entrepot_client import EntrepotSync

    with EntrepotSync(target, server_token("seeder"), TEST_CHANNEL) as ep:
        ep.inventory.create_warehouse(
            inv.CreateWarehouseRequest(warehouse=inv.Warehouse(code=SEED_WAREHOUSE, name="Paris", priority=1))
        )
        for sku in SEED_SKUS:
            ep.inventory.upsert_inventory_item(
                inv.UpsertInventoryItemRequest(item=inv.InventoryItem(sku=sku, track_inventory=True))
            )
            ep.inventory.set_stock(
                inv.SetStockRequest(sku=sku, warehouse_code=SEED_WAREHOUSE, quantity=10, reason="seed")
            )


@pytest.fixture(scope="module")
def fuzz_channel(fuzz_server: ServerProcess) -> Iterator[grpc.Channel]:
    # The client may send anything the server should then refuse itself.
    with grpc.insecure_channel(fuzz_server.target, options=[("grpc.max_send_message_length", -1)]) as ch:
        yield ch


@pytest.fixture(scope="module")
def metadata() -> list[tuple[str, str]]:
    tok = server_token("fuzzer", status_namespaces=["*", "fuzz"])
    return [("authorization", f"Bearer {tok}"), ("x-channel-slug", TEST_CHANNEL)]


def requests_for(method: MethodDescriptor) -> st.SearchStrategy[Any]:
    one = messages(method.input_type)
    if method.client_streaming:
        return st.lists(one, max_size=3)
    return one


def show(request: Message | list[Message]) -> str:
    if isinstance(request, list):
        return "[\n" + ",\n".join(show(r) for r in request) + "\n]"
    return "{" + text_format.MessageToString(request, as_one_line=True, print_unknown_fields=True) + "}"


def assert_healthy(server: ServerProcess, channel: grpc.Channel) -> None:
    assert server.alive(), f"the server died:\n{server.log_tail()}"
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_generated_requests_never_fail_internally(
    fuzz_server: ServerProcess,
    fuzz_channel: grpc.Channel,
    metadata: list[tuple[str, str]],
    method: MethodDescriptor,
) -> None:
    streaming = method.server_streaming
    # A server stream that accepts its input never ends: read a little, then the deadline.
    timeout = 0.5 if streaming else 5.0
    examples = soak(4, 150) if streaming else soak(15, 500)

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=not LONG,  # CI is reproducible; the soak explores
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        print_blob=True,
    )
    @given(requests_for(method))
    def run(request: Any) -> None:
        code, details = call_sync(fuzz_channel, method, request, metadata, timeout)
        assert code not in BAD, f"{full_name(method)} -> {code.name}: {details}\nrequest: {show(request)}"
        assert fuzz_server.alive(), f"the server died on {show(request)}:\n{fuzz_server.log_tail()}"

    try:
        run()
    finally:
        # Generated calls may have deactivated or changed the test channel: restore it for the next method.
        asyncio.run(_sql(fuzz_server.env["DATABASE_URL"], RESTORE_TEST_CHANNEL))
    assert_healthy(fuzz_server, fuzz_channel)


def _oversized(size: int) -> bytes:
    """A well-formed message body of `size` bytes: one unknown length-delimited field (no. 536870911)."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b = n & 0x7F
            n >>= 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    head = varint((536870911 << 3) | 2)
    payload_len = size - len(head) - len(varint(size))
    return head + varint(payload_len) + b"\0" * payload_len


def test_oversized_messages_and_metadata_are_resource_exhausted(
    fuzz_server: ServerProcess, fuzz_channel: grpc.Channel, metadata: list[tuple[str, str]]
) -> None:
    """A message over the limit and metadata over the default 16 KiB are refused before any
    handler runs. The transport checks them before dispatch, so CI sends them to one method of
    each shape per service (each costs a reconnect); the soak sends them to every method."""
    big = _oversized(MAX_MESSAGE_BYTES + 1024)
    wrong = []
    for method in METHODS if LONG else _one_per_shape():
        kw = method_kwargs(method)
        kw["request_serializer"] = lambda _msg: big  # raw bytes: the server must refuse them unread
        name = full_name(method)
        if method.client_streaming:
            call: Any = (
                fuzz_channel.stream_stream(name, **kw)
                if method.server_streaming
                else fuzz_channel.stream_unary(name, **kw)
            )
            codes = [_code(lambda c=call: _consume(c(iter([None]), metadata=metadata, timeout=10)))]
        else:
            call = (
                fuzz_channel.unary_stream(name, **kw)
                if method.server_streaming
                else fuzz_channel.unary_unary(name, **kw)
            )
            codes = [_code(lambda c=call: _consume(c(None, metadata=metadata, timeout=10)))]
        codes.append(
            call_sync(
                fuzz_channel,
                method,
                [] if method.client_streaming else _empty(method),
                [*metadata, ("x-padding", "p" * 20_000)],
                5,
            )[0]
        )
        # A client-streaming handler may answer before reading anything: only then (and only
        # with UNIMPLEMENTED for a method not written yet) may the size check not be the answer.
        allowed = {grpc.StatusCode.RESOURCE_EXHAUSTED}
        if method.client_streaming:
            allowed.add(grpc.StatusCode.UNIMPLEMENTED)
        if codes[0] not in allowed or codes[1] != grpc.StatusCode.RESOURCE_EXHAUSTED:
            wrong.append((name, codes))
    assert not wrong, wrong
    assert_healthy(fuzz_server, fuzz_channel)


def _one_per_shape() -> list[MethodDescriptor]:
    seen: dict[tuple[str, bool, bool], MethodDescriptor] = {}
    for m in METHODS:
        seen.setdefault((m.containing_service.full_name, m.client_streaming, m.server_streaming), m)
    return list(seen.values())


def _empty(method: MethodDescriptor) -> Message:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(method.input_type)()


def _consume(result: Any) -> None:
    if hasattr(result, "__iter__") and not isinstance(result, Message):
        for _ in result:
            break


def _code(fn: Any) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return,attr-defined]
    return grpc.StatusCode.OK


def test_r1_invariants_hold_after_the_fuzz_run(fuzz_server: ServerProcess, fuzz_database: str) -> None:
    """Runs after the fuzz tests above (file order): whatever they did to stock, every level
    still satisfies R1 (no negative or oversold counters, counters = ledger = open holds)."""
    from sqlalchemy.ext.asyncio import AsyncSession

    from domain.shared.db import make_engine, make_session_factory
    from tests.inventory_support import check_invariants

    async def check() -> int:
        engine = make_engine(fuzz_database, pool_size=1, max_overflow=0)
        try:
            session: AsyncSession
            async with make_session_factory(engine)() as session:
                return await check_invariants(session)
        finally:
            await engine.dispose()

    assert asyncio.run(check()) >= len(SEED_SKUS)
