"""Helpers shared by the reliability tests: soak switch, logged server processes, a private
embedded PostgreSQL that tests may stop and start, and generic calls built from descriptors."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from tests.procs import ROOT

LONG = os.environ.get("ENTREPOT_SOAK", "").lower() == "long"


def soak(short: int, long: int) -> int:
    """An example count / duration: the short form in CI, the long one under `make soak`."""
    return long if LONG else short


class PrivatePostgres:
    """An embedded PostgreSQL of our own (never the machine's), so it can be stopped and restarted."""

    def __init__(self, pgdata: Path) -> None:
        from server.devservices import embedded_postgres_url

        self.pgdata = pgdata
        self.url = embedded_postgres_url(pgdata)

    # pg_ctl runs in a fresh interpreter: forking this process (gRPC threads, and a setuid child
    # when running as root) crashes the child, so the fork happens from a process without gRPC.
    def stop(self) -> None:
        self._pg_ctl("from server.devservices import stop_embedded_postgres as f; f(p)")

    def start(self) -> None:
        # get_server() caches its server object, so a restart goes through pg_ctl directly,
        # on the same socket directory the URL names.
        self._pg_ctl(
            "import os; from embedded_postgres import pg_ctl; "
            "u = 'embedded_postgres' if os.geteuid() == 0 else None; "
            "pg_ctl(['-w', '-o', '-h \"\"', '-o', f'-k {p}', '-l', str(p / 'restart.log'), 'start'],"
            " pgdata=p, user=u, timeout=30)"
        )

    def _pg_ctl(self, code: str) -> None:
        script = f"from pathlib import Path; p = Path({str(self.pgdata)!r}); {code}"
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, timeout=60, capture_output=True, text=True
        )
        if done.returncode:
            raise RuntimeError(f"pg_ctl failed ({done.returncode}): {done.stderr[-3000:]}")

    def database(self, name: str) -> str:
        from tests.pg import with_database

        async def create() -> None:
            conn = await asyncpg.connect(self.url)
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        asyncio.run(create())
        url = with_database(self.url, name)
        import migrations

        migrations.upgrade(url)
        return url


def method_kwargs(method: MethodDescriptor) -> dict[str, Any]:
    req_cls = message_factory.GetMessageClass(method.input_type)
    resp_cls = message_factory.GetMessageClass(method.output_type)
    return {"request_serializer": req_cls.SerializeToString, "response_deserializer": resp_cls.FromString}


def full_name(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def call_sync(
    channel: grpc.Channel,
    method: MethodDescriptor,
    requests: Message | Iterable[Message],
    metadata: Sequence[tuple[str, str]],
    timeout: float,
    max_responses: int = 5,
) -> tuple[grpc.StatusCode, str]:
    """Any RPC shape with a blocking channel; returns (code, details). A server stream is read
    for at most `max_responses` items (streams that never end are cancelled: that is OK)."""
    name, kw = full_name(method), method_kwargs(method)
    md = list(metadata)
    try:
        if method.client_streaming:
            msgs = list(requests)  # type: ignore[arg-type]
            if method.server_streaming:
                call = channel.stream_stream(name, **kw)(iter(msgs), metadata=md, timeout=timeout)
                _drain(call, max_responses)
            else:
                channel.stream_unary(name, **kw)(iter(msgs), metadata=md, timeout=timeout)
        elif method.server_streaming:
            call = channel.unary_stream(name, **kw)(requests, metadata=md, timeout=timeout)
            _drain(call, max_responses)
        else:
            channel.unary_unary(name, **kw)(requests, metadata=md, timeout=timeout)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, ""


def _drain(call: Any, max_responses: int) -> None:
    for i, _ in enumerate(call):
        if i + 1 >= max_responses:
            call.cancel()
            return


def wait_until(predicate: Any, timeout: float, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return bool(predicate())
