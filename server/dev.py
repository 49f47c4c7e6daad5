"""`entrepot dev`: everything on one machine with one command.

With no DATABASE_URL it runs embedded PostgreSQL (data in .entrepot/dev/pg,
kept across restarts); with no TEMPORAL_ADDRESS it runs Temporal's dev server
(state in .entrepot/dev/temporal.db). Then it migrates, makes sure the
`default` channel exists, starts the server and the worker, prints a dev token
and a first call, and stops every child on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.devservices import (
    embedded_postgres_url,
    free_port,
    start_temporal_dev_server,
    stop_embedded_postgres,
    stop_processes,
)


def _secret(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    path.write_text(value)
    path.chmod(0o600)
    return value


def _with_database(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(url)._replace(path="/" + name))


async def _create_database_if_missing(url: str, name: str) -> None:
    conn = await asyncpg.connect(_with_database(url, "postgres"))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def _wait_serving(target: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            except grpc.RpcError:
                r = None  # not listening yet: ask again
            if r is not None and r.status == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.2)
    raise TimeoutError(f"server at {target} not healthy after {timeout}s")


def run_dev(args: argparse.Namespace) -> int:
    started = time.monotonic()
    data = Path(os.environ.get("ENTREPOT_DATA_DIR", ".entrepot")).resolve() / "dev"
    data.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("ENTREPOT_JWT_HS256_SECRET", _secret(data / "jwt-secret"))
    children: list[subprocess.Popen[bytes]] = []
    temporal: subprocess.Popen[bytes] | None = None
    embedded_pg = not env.get("DATABASE_URL")
    try:
        if embedded_pg:
            print("starting embedded PostgreSQL (data in .entrepot/dev/pg) ...", flush=True)
            server_url = embedded_postgres_url(data / "pg")
            asyncio.run(_create_database_if_missing(server_url, "entrepot"))
            env["DATABASE_URL"] = _with_database(server_url, "entrepot")
        if not env.get("TEMPORAL_ADDRESS"):
            port = args.temporal_port
            try:
                temporal = start_temporal_dev_server(data / "temporal.db", port=port)
            except TimeoutError:
                port = free_port()
                temporal = start_temporal_dev_server(data / "temporal.db", port=port)
            env["TEMPORAL_ADDRESS"] = f"127.0.0.1:{port}"
            print(f"started Temporal dev server on 127.0.0.1:{port}", flush=True)

        entrepot = [sys.executable, "-m", "server.cli"]
        subprocess.run([*entrepot, "migrate"], env=env, check=True)
        subprocess.run(
            [
                *entrepot,
                "channel",
                "create",
                "default",
                "--name",
                "Default",
                "--currency",
                "EUR",
                "--if-missing",
            ],
            env=env,
            check=True,
        )
        serve = [*entrepot, "serve", "--listen", args.listen, "--metrics-port", str(args.metrics_port)]
        children.append(subprocess.Popen(serve, env=env))
        if not args.no_worker:
            children.append(subprocess.Popen([*entrepot, "worker"], env=env))
        _wait_serving(args.listen, 60)
        token = subprocess.run(
            [*entrepot, "token", "--sub", "dev", "--permissions", "*", "--channels", "*", "--ttl", "86400"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        print(
            f"\nEntrepot is serving on {args.listen} (healthy after {time.monotonic() - started:.1f}s)\n"
            f"metrics: http://127.0.0.1:{args.metrics_port}/metrics\n\n"
            f"dev token (24 h, every permission, every channel):\n  export ENTREPOT_TOKEN={token}\n\n"
            "first call:\n"
            f"  .venv/bin/python -m entrepot_client.cli --target {args.listen} --token $ENTREPOT_TOKEN "
            "--channel default call channel.list_channels\n\nCtrl-C stops everything.\n",
            flush=True,
        )
        stop = {"now": False}

        def _stop(signum: int, frame: object) -> None:
            stop["now"] = True

        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGTERM, _stop)
        while not stop["now"]:
            if any(c.poll() is not None for c in children):
                print("a child process exited; stopping", file=sys.stderr)
                return_code = 1
                break
            time.sleep(0.3)
        else:
            return_code = 0
        return return_code
    finally:
        stop_processes(children, timeout=20)
        if temporal is not None:
            os.killpg(temporal.pid, signal.SIGTERM)
            try:
                temporal.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(temporal.pid, signal.SIGKILL)
        if embedded_pg:
            stop_embedded_postgres(data / "pg")
        print("stopped", flush=True)
