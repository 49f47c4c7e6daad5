"""R6: PostgreSQL restarts under load.

A real server process against a private embedded PostgreSQL (never the machine's), a steady load
of reads (sessions and the GetStockLevel read pool), idempotent channel creates and stock adjustments; PostgreSQL is stopped, then started again:
- during the outage calls fail fast with UNAVAILABLE (DATABASE_UNAVAILABLE), well inside their
  deadline, and health reports NOT_SERVING;
- afterwards health is SERVING and calls succeed, without restarting the server: no call that
  starts once PostgreSQL accepts connections again fails (a pooled connection the restart closed
  is replaced and the transaction run on a fresh one, domain/shared/uow.py);
- the same when every connection of the server is terminated with the database up
  (pg_terminate_backend): no call that starts after the kill fails;
- nothing is half-written: retrying every create that did not get an answer, with its request_id,
  yields exactly one channel, one outbox event and one idempotency record per request, and every
  stock adjustment applied exactly once with counters, ledger and outbox in agreement (R1's checks).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from entrepot.inventory.v1 import inventory_pb2, inventory_pb2_grpc
from entrepot.platform.v1 import channel_pb2, channel_pb2_grpc
from tests.procs import ServerProcess, server_token
from tests.reliability.support import PrivatePostgres, soak, wait_until

DEADLINE = 3.0  # per call
FAST = 2.0  # an outage must be reported well within the deadline (2/3 of it: the machine is noisy)


@dataclass
class Outcome:
    started: float
    elapsed: float
    code: grpc.StatusCode
    reason: str = ""
    method: str = ""


@dataclass
class Load:
    stub: channel_pb2_grpc.ChannelServiceStub
    metadata: list[tuple[str, str]]
    prefix: str
    outcomes: list[Outcome] = field(default_factory=list)
    # request_id -> slug of every create attempted, and the ids that got an OK answer
    creates: dict[str, str] = field(default_factory=dict)
    created_ok: set[str] = field(default_factory=set)
    inventory: inventory_pb2_grpc.InventoryServiceStub | None = None
    # request_id of every stock adjustment (+1 on SKU) attempted, and those answered OK
    adjusts: set[str] = field(default_factory=set)
    adjusted_ok: set[str] = field(default_factory=set)
    stop: bool = False

    async def worker(self, n: int) -> None:
        i = 0
        while not self.stop:
            i += 1
            started = time.monotonic()
            rid = ""
            method = "ListChannels"
            try:
                if i % 3 == 0 and self.inventory is not None:
                    method, rid = "AdjustStock", f"adj-{self.prefix}-{n}-{i}"
                    self.adjusts.add(rid)
                    await self.inventory.AdjustStock(adjust(rid), metadata=self.metadata, timeout=DEADLINE)
                    self.adjusted_ok.add(rid)
                elif i % 3 == 1:
                    method, rid = "CreateChannel", f"{self.prefix}-{n}-{i}"
                    slug = rid
                    self.creates[rid] = slug
                    await self.stub.CreateChannel(
                        channel_pb2.CreateChannelRequest(
                            channel=channel_pb2.Channel(slug=slug, name="R6", currency="EUR"), request_id=rid
                        ),
                        metadata=self.metadata,
                        timeout=DEADLINE,
                    )
                    self.created_ok.add(rid)
                elif self.inventory is not None and (i // 3) % 2:
                    # The coalesced hot read, on its own asyncpg pool.
                    method = "GetStockLevel"
                    await self.inventory.GetStockLevel(
                        inventory_pb2.GetStockLevelRequest(sku=SKU), metadata=self.metadata, timeout=DEADLINE
                    )
                else:
                    await self.stub.ListChannels(
                        channel_pb2.ListChannelsRequest(page_size=5), metadata=self.metadata, timeout=DEADLINE
                    )
                code, reason = grpc.StatusCode.OK, ""
            except grpc.aio.AioRpcError as err:
                code, reason = err.code(), _reason(err)
            self.outcomes.append(Outcome(started, time.monotonic() - started, code, reason, method))
            await asyncio.sleep(0.02)


SKU, WAREHOUSE, INITIAL = "R6-SKU", "R6WH", 100


def adjust(rid: str) -> inventory_pb2.AdjustStockRequest:
    return inventory_pb2.AdjustStockRequest(
        sku=SKU, warehouse_code=WAREHOUSE, delta=1, reason="r6", request_id=rid
    )


async def seed_stock(stub: inventory_pb2_grpc.InventoryServiceStub, metadata: list[tuple[str, str]]) -> None:
    await stub.CreateWarehouse(
        inventory_pb2.CreateWarehouseRequest(warehouse=inventory_pb2.Warehouse(code=WAREHOUSE, name="R6")),
        metadata=metadata,
    )
    await stub.UpsertInventoryItem(
        inventory_pb2.UpsertInventoryItemRequest(
            item=inventory_pb2.InventoryItem(sku=SKU, track_inventory=True)
        ),
        metadata=metadata,
    )
    await stub.SetStock(
        inventory_pb2.SetStockRequest(sku=SKU, warehouse_code=WAREHOUSE, quantity=INITIAL, reason="seed"),
        metadata=metadata,
    )


async def mixed_call(
    i: int,
    inventory: inventory_pb2_grpc.InventoryServiceStub,
    channels: channel_pb2_grpc.ChannelServiceStub,
    metadata: list[tuple[str, str]],
    prefix: str,
) -> tuple[str, grpc.StatusCode]:
    """Call number i of a mix (the coalesced read, a plain read, a keyed write): its kind and code."""
    kind = ("GetStockLevel", "ListChannels", "AdjustStock")[i % 3]
    try:
        if kind == "GetStockLevel":
            await inventory.GetStockLevel(
                inventory_pb2.GetStockLevelRequest(sku=SKU), metadata=metadata, timeout=10
            )
        elif kind == "ListChannels":
            await channels.ListChannels(
                channel_pb2.ListChannelsRequest(page_size=5), metadata=metadata, timeout=10
            )
        else:
            await inventory.AdjustStock(adjust(f"{prefix}-{uuid.uuid4().hex}"), metadata=metadata, timeout=10)
        return kind, grpc.StatusCode.OK
    except grpc.aio.AioRpcError as err:
        return kind, err.code()


async def start_load(
    ch: grpc.aio.Channel, metadata: list[tuple[str, str]], prefix: str
) -> tuple[Load, list[asyncio.Task[None]]]:
    """Stock seeded, then 8 workers calling in a loop until `load.stop`."""
    inventory = inventory_pb2_grpc.InventoryServiceStub(ch)
    await seed_stock(inventory, metadata)
    load = Load(
        channel_pb2_grpc.ChannelServiceStub(ch), metadata, prefix + uuid.uuid4().hex[:6], inventory=inventory
    )
    return load, [asyncio.create_task(load.worker(n)) for n in range(8)]


def _reason(err: grpc.aio.AioRpcError) -> str:
    from google.rpc import error_details_pb2, status_pb2

    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for d in status.details:
                info = error_details_pb2.ErrorInfo()
                if d.Unpack(info):
                    return info.reason
    return ""


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    # Not under pytest's tmp dirs: those are private to root, and the embedded server may run
    # as its own user (when the tests run as root), which must reach its data directory.
    base = Path(tempfile.mkdtemp(prefix="entrepot-r6-"))
    base.chmod(0o755)
    pg = PrivatePostgres(base / "pg")
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def r6_database(private_pg: PrivatePostgres) -> str:
    return private_pg.database("r6_" + uuid.uuid4().hex[:8])


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        try:
            return int(
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status
            )
        except grpc.RpcError:
            return -1


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.timeout(soak(240, 900))
async def test_postgres_restart_under_load(
    private_pg: PrivatePostgres, r6_database: str, tmp_path: Path
) -> None:
    url = r6_database
    restarts = soak(1, 5)
    outage = soak(4, 10)  # longer than FAST + 0.5 s, so some calls start well inside it
    with ServerProcess(url, tmp_path) as server:
        metadata = [("authorization", f"Bearer {server_token()}")]
        async with grpc.aio.insecure_channel(server.target) as ch:
            inventory = inventory_pb2_grpc.InventoryServiceStub(ch)
            load, workers = await start_load(ch, metadata, "r6-")
            try:
                await asyncio.sleep(1.5)
                for _ in range(restarts):
                    assert _ok_since(load, time.monotonic() - 1.5), "calls fail before the outage"
                    await asyncio.to_thread(private_pg.stop)
                    down_at = time.monotonic()
                    went_down = await asyncio.to_thread(
                        wait_until, lambda: _health(server.target) == NOT_SERVING, 5
                    )
                    assert went_down, "health did not report NOT_SERVING with the database down"
                    await asyncio.sleep(outage)
                    await asyncio.to_thread(private_pg.start)
                    up_at = time.monotonic()
                    came_back = await asyncio.to_thread(
                        wait_until, lambda: _health(server.target) == SERVING, 15
                    )
                    assert came_back, "health did not come back to SERVING"
                    back_after = time.monotonic() - up_at
                    await asyncio.sleep(2.5)
                    during = [o for o in load.outcomes if down_at + 0.5 < o.started < up_at - FAST]
                    assert during, "no call was made during the outage"
                    slow = [o for o in during if o.elapsed > FAST]
                    worst = max(during, key=lambda o: o.elapsed)
                    print(
                        f"R6 outage: {len(during)} calls, slowest {worst.elapsed * 1000:.1f} ms"
                        f" (started {worst.started - down_at:.1f} s into the outage);"
                        f" health SERVING {back_after:.1f} s after PostgreSQL started"
                    )
                    assert not slow, f"calls hung during the outage: {slow[:3]}"
                    codes = {(o.code, o.reason) for o in during}
                    assert codes == {(grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")}, codes
                    after = [o for o in load.outcomes if o.started >= up_at]
                    failed_after = [o for o in after if o.code != grpc.StatusCode.OK]
                    print(f"R6 after the restart: {len(failed_after)} of {len(after)} calls failed")
                    assert after, "no call was made after the restart"
                    assert not failed_after, f"calls failed after the database was back: {failed_after[:5]}"
            finally:
                load.stop = True
                await asyncio.gather(*workers)
            anything_bad = {o.code for o in load.outcomes} - {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
            assert not anything_bad, anything_bad

            # Every create that got no answer is retried with its request_id: it must now succeed,
            # whether the first attempt committed (stored answer) or not (runs now).
            stub = channel_pb2_grpc.ChannelServiceStub(ch)
            for rid, slug in load.creates.items():
                if rid not in load.created_ok:
                    await stub.CreateChannel(
                        channel_pb2.CreateChannelRequest(
                            channel=channel_pb2.Channel(slug=slug, name="R6", currency="EUR"), request_id=rid
                        ),
                        metadata=metadata,
                        timeout=DEADLINE,
                    )
            for rid in load.adjusts - load.adjusted_ok:
                await inventory.AdjustStock(adjust(rid), metadata=metadata, timeout=DEADLINE)
        assert server.alive(), server.log_tail()
        assert server.terminate() == 0

    failed = len(load.creates) - len(load.created_ok)
    assert failed > 0, "the outage should have made some creates fail"
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetchval(
            "SELECT count(*) FROM platform.channels WHERE slug LIKE $1", load.prefix + "%"
        )
        events = await conn.fetchval(
            "SELECT count(*) FROM platform.outbox WHERE topic = 'channel.created' AND aggregate_id LIKE $1",
            load.prefix + "%",
        )
        keys = await conn.fetchval(
            "SELECT count(*) FROM platform.idempotency_keys WHERE request_id LIKE $1 AND status_code = 0"
            " AND response IS NOT NULL",
            load.prefix + "%",
        )
    finally:
        await conn.close()
    assert rows == events == keys == len(load.creates)
    # Stock counters: each adjustment applied exactly once, ledger and outbox agree (R1's checks).
    assert load.adjusts - load.adjusted_ok, "the outage should have made some adjustments fail"
    on_hand = await _on_hand(url)
    assert on_hand == INITIAL + len(load.adjusts)
    assert await _invariants(url) >= 1


async def _on_hand(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval(
                "SELECT on_hand FROM inventory.stock_levels WHERE sku = $1 AND warehouse_code = $2",
                SKU,
                WAREHOUSE,
            )
        )
    finally:
        await conn.close()


async def _invariants(url: str) -> int:
    from domain.shared.db import make_engine, make_session_factory
    from tests.inventory_support import check_invariants

    engine = make_engine(url, pool_size=1, max_overflow=0)
    try:
        async with make_session_factory(engine)() as session:
            return await check_invariants(session)
    finally:
        await engine.dispose()


def _ok_since(load: Load, since: float) -> bool:
    recent = [o for o in load.outcomes if o.started >= since]
    return bool(recent) and all(o.code == grpc.StatusCode.OK for o in recent)


@pytest.mark.timeout(soak(120, 600))
async def test_mass_connection_kill_fails_no_later_call(
    private_pg: PrivatePostgres, r6_database: str, tmp_path: Path
) -> None:
    """Every connection of the server (sessions, read pool, watch hub) terminated at once with
    the database up: calls in flight may fail (UNAVAILABLE), any call that starts afterwards
    succeeds, on a fresh connection."""
    url = r6_database
    kills = soak(3, 20)
    with ServerProcess(url, tmp_path) as server:
        metadata = [("authorization", f"Bearer {server_token()}")]
        async with grpc.aio.insecure_channel(server.target) as ch:
            load, workers = await start_load(ch, metadata, "kill-")
            # (when the kill began, when every terminated backend was gone)
            windows: list[tuple[float, float]] = []
            try:
                await asyncio.sleep(1.0)
                for _ in range(kills):
                    began = time.monotonic()
                    killed = await _terminate_server_connections(url)
                    windows.append((began, time.monotonic()))
                    assert killed >= 2, f"only {killed} server connections to terminate"
                    await asyncio.sleep(1.5)
            finally:
                load.stop = True
                await asyncio.gather(*workers)
        assert server.alive(), server.log_tail()

    # A call in flight while a kill runs may fail; every call that starts after a kill and
    # ends before the next one begins must succeed.
    after = [
        o
        for o in load.outcomes
        if o.started >= windows[0][1]
        and not any(o.started < done and o.started + o.elapsed >= began for began, done in windows)
    ]
    failed = [o for o in after if o.code != grpc.StatusCode.OK]
    print(f"R6 mass kill: {len(failed)} of {len(after)} calls started after a kill failed ({kills} kills)")
    assert after, "no call was made after a kill"
    assert not failed, [(o.method, o.code, o.reason) for o in failed]
    assert {o.code for o in load.outcomes} <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
    assert await _on_hand(url) == INITIAL + len(load.adjusted_ok) + len(
        await _applied(url, load.adjusts - load.adjusted_ok)
    )


async def _terminate_server_connections(url: str) -> int:
    """pg_terminate_backend of every connection of the server (its application names) to the
    test database; returns once they are all gone (termination is asynchronous)."""
    conn = await asyncpg.connect(url)
    try:
        pids = await conn.fetch(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND application_name LIKE 'entrepot%'"
        )
        gone = False
        for _ in range(200):
            left = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", [r["pid"] for r in pids]
            )
            if left == 0:
                gone = True
                break
            await asyncio.sleep(0.01)
        assert gone, "terminated connections did not go away"
        return len(pids)
    finally:
        await conn.close()


async def _applied(url: str, request_ids: set[str]) -> set[str]:
    """The adjustments among `request_ids` that committed though their caller got no answer."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT request_id FROM platform.idempotency_keys WHERE request_id = ANY($1::text[])",
            list(request_ids),
        )
    finally:
        await conn.close()
    return {r["request_id"] for r in rows}


@pytest.mark.timeout(soak(120, 600))
async def test_connections_that_died_unnoticed_are_replaced(
    private_pg: PrivatePostgres, r6_database: str, tmp_path: Path
) -> None:
    """The server's connections are terminated while its process is stopped (SIGSTOP), and
    calls are already waiting when it resumes: it meets connections the database closed
    before the driver noticed. Each call's first BEGIN or read then finds its connection
    dead before sending anything, and must run on a fresh one instead of failing."""
    url = r6_database
    rounds = soak(3, 10)
    with ServerProcess(url, tmp_path) as server:
        assert server.proc is not None
        metadata = [("authorization", f"Bearer {server_token()}")]
        async with grpc.aio.insecure_channel(server.target) as ch:
            inventory = inventory_pb2_grpc.InventoryServiceStub(ch)
            channels = channel_pb2_grpc.ChannelServiceStub(ch)
            await seed_stock(inventory, metadata)

            def one(i: int) -> Awaitable[tuple[str, grpc.StatusCode]]:
                return mixed_call(i, inventory, channels, metadata, "unnoticed")

            failed: list[tuple[str, grpc.StatusCode]] = []
            total = 0
            for _ in range(rounds):
                # Every pool full of open connections first.
                assert all(
                    c == grpc.StatusCode.OK for _, c in await asyncio.gather(*(one(i) for i in range(24)))
                )
                os.kill(server.proc.pid, signal.SIGSTOP)
                try:
                    assert await _terminate_server_connections(url) >= 2
                    calls = [asyncio.ensure_future(one(i)) for i in range(24)]
                    await asyncio.sleep(0.3)  # the calls reach the stopped server's socket
                finally:
                    os.kill(server.proc.pid, signal.SIGCONT)
                results = await asyncio.gather(*calls)
                total += len(results)
                failed += [r for r in results if r[1] != grpc.StatusCode.OK]
        assert server.alive(), server.log_tail()
    print(f"R6 connections dead unnoticed: {len(failed)} of {total} calls failed ({rounds} rounds)")
    assert not failed, failed


class SeveringProxy:
    """A TCP proxy to PostgreSQL that can cut every connection through it the way a firewall
    or load balancer dropping idle connections does: the database side is closed at once, the
    server's side only when the server next sends something. The server's driver cannot know
    before it sends: the connection is found dead on its first statement."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        socket_dir = parse_qs(parts.query).get("host", [""])[0]
        self.upstream = (socket_dir, parts.hostname or "", parts.port or 5432)
        self.pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.severed: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.port = 0
        db = parts.path.lstrip("/")
        self.url = f"postgresql://{parts.username or 'postgres'}@127.0.0.1:{{port}}/{db}"

    async def __aenter__(self) -> SeveringProxy:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = self.url.format(port=self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for a, b in self.pairs:
            a.close()
            b.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        socket_dir, host, port = self.upstream
        if socket_dir:
            up_r, up_w = await asyncio.open_unix_connection(f"{socket_dir}/.s.PGSQL.{port}")
        else:
            up_r, up_w = await asyncio.open_connection(host, port)
        self.pairs.append((writer, up_w))
        await asyncio.gather(self._pump(reader, up_w, writer, True), self._pump(up_r, writer, writer, False))

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        client: asyncio.StreamWriter,
        outbound: bool,
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                if outbound and client in self.severed:
                    client.close()  # the server spoke on a cut connection: now it learns
                    return
                dst.write(data)
                await dst.drain()
        if client not in self.severed:
            dst.close()

    def sever(self) -> int:
        """Cuts every connection open now; returns how many."""
        n = 0
        for client, up in self.pairs:
            if client not in self.severed:
                self.severed.add(client)
                up.close()
                n += 1
        return n


@pytest.mark.timeout(soak(120, 600))
async def test_connections_cut_silently_are_replaced_on_first_use(
    private_pg: PrivatePostgres, r6_database: str, tmp_path: Path
) -> None:
    """Every pooled connection cut without the server noticing (SeveringProxy): each call
    finds its connection dead at its first statement (BEGIN, or the read pool's read), before
    it did anything; it is run again on a fresh connection and succeeds."""
    rounds = soak(3, 10)
    async with SeveringProxy(r6_database) as proxy:
        with ServerProcess(proxy.url, tmp_path) as server:
            metadata = [("authorization", f"Bearer {server_token()}")]
            async with grpc.aio.insecure_channel(server.target) as ch:
                inventory = inventory_pb2_grpc.InventoryServiceStub(ch)
                channels = channel_pb2_grpc.ChannelServiceStub(ch)
                await seed_stock(inventory, metadata)

                def one(i: int) -> Awaitable[tuple[str, grpc.StatusCode]]:
                    return mixed_call(i, inventory, channels, metadata, "cut")

                failed: list[tuple[str, grpc.StatusCode]] = []
                total = 0
                for _ in range(rounds):
                    warm = await asyncio.gather(*(one(i) for i in range(24)))  # pools full of connections
                    assert all(c == grpc.StatusCode.OK for _, c in warm), warm
                    assert proxy.sever() >= 2
                    for i in range(12):  # one call at a time: each meets the pool as the last left it
                        result = await one(i)
                        total += 1
                        if result[1] != grpc.StatusCode.OK:
                            failed.append(result)
            assert server.alive(), server.log_tail()
    print(f"R6 connections cut silently: {len(failed)} of {total} calls failed ({rounds} rounds)")
    assert not failed, failed
