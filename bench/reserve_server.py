"""Server cases of bench/reserve.py: a real `entrepot serve` process, client load
from another process, invariants checked in the database afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.devservices import free_port, stop_processes

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-not-for-production-0123456789"


def _wait_healthy(target: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server for {target} exited with {proc.returncode} before it was healthy")
        try:
            with grpc.insecure_channel(target) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass  # not up yet; polled again until the deadline
        time.sleep(0.2)
    raise RuntimeError(f"the server for {target} was not healthy after {timeout:.0f} s")


def _batch_sizes(metrics_port: int) -> tuple[int, int] | None:
    """(batches, requests) of the server's group-commit batcher, from its Prometheus
    endpoint (None when it did not batch)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    found = dict(re.findall(r"^entrepot_reserve_batch_size_(count|sum) ([0-9.e+]+)$", body, re.MULTILINE))
    if not found or not float(found.get("count", 0)):
        return None
    return int(float(found["count"])), int(float(found["sum"]))


def _drive(
    target: str,
    server_pid: int | list[int],
    token: str,
    *,
    skus: int,
    clients: int,
    seconds: int,
    op: str,
    sku_prefix: str = "B",
) -> dict[str, Any]:
    """Run bench.reserve_client against `target` (one or several, comma-separated):
    its summary plus the CPU per call of the server processes, client and database
    (CpuMeter)."""
    from bench.common import CpuMeter

    meter = CpuMeter(server_pid, children=True)  # the client is the child process below
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.reserve_client",
            "--target",
            target,
            "--token",
            token,
            "--skus",
            str(skus),
            "--clients",
            str(clients),
            "--seconds",
            str(seconds),
            "--op",
            op,
            "--sku-prefix",
            sku_prefix,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    load = json.loads(out.strip().splitlines()[-1])
    return {
        "tps": load["ok"] / load["elapsed"],
        **load,
        **meter.per_call(load["ok"] + load["refused"] + load["errors"]),
    }


def run_bare_case(*, clients: int, seconds: int) -> dict[str, Any]:
    """The ceiling of ReserveStock on this machine with this client: the bare grpc.aio
    server answering a constant reservation (no interceptors, no database)."""
    from bench.common import start_bare_server

    bare, target = start_bare_server()
    try:
        return _drive(target, bare.pid, "unused", skus=1, clients=clients, seconds=seconds, op="reserve")
    finally:
        bare.terminate()
        bare.wait(10)


def run_server_case(
    url: str,
    *,
    spread: bool,
    batched: bool,
    clients: int,
    seconds: int,
    op: str = "reserve",
    servers: int = 1,
    kits: bool = False,
) -> dict[str, Any]:
    """`servers` processes on one database, each on its own port (replicas, as behind a
    load balancer); the client spreads its connections over them. With `kits`, the
    callers reserve bench/kits.py's kits (each 1 + 2 units of two of the SKUs)."""
    from bench.kits import KIT_LEDGER_ROWS, KIT_UNITS, define_kits
    from bench.reserve import SPREAD, _prepare, check_no_oversell
    from domain.shared.db import make_engine, make_session_factory
    from server.auth import mint_token
    from server.settings import Settings

    async def prepare() -> None:
        engine = make_engine(url, pool_size=2, max_overflow=0)
        try:
            await _prepare(make_session_factory(engine), spread=spread)
            if kits:
                await define_kits(make_session_factory(engine))
        finally:
            await engine.dispose()

    asyncio.run(prepare())
    targets = [f"127.0.0.1:{free_port()}" for _ in range(servers)]
    metrics_ports = [free_port() for _ in range(servers)]
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "ENTREPOT_JWT_HS256_SECRET": SECRET,
        "ENTREPOT_ACCESS_LOG": "false",
        "ENTREPOT_LOG_LEVEL": "WARNING",
        "ENTREPOT_RESERVE_BATCHING": "true" if batched else "false",
        "ENTREPOT_DB_POOL_SIZE": "20",
        "ENTREPOT_DB_MAX_OVERFLOW": "20",
    }
    env.pop("TEMPORAL_ADDRESS", None)
    procs = [
        subprocess.Popen(
            [str(Path(sys.executable).parent / "entrepot"), "serve", "--listen", t, "--metrics-port", str(m)],
            env=env,
            cwd=ROOT,
        )
        for t, m in zip(targets, metrics_ports, strict=True)
    ]
    try:
        for t, p in zip(targets, procs, strict=True):
            _wait_healthy(t, p)
        token = mint_token(
            Settings(jwt_hs256_secret=SECRET),
            sub="bench",
            permissions=["inventory.reserve", "inventory.read"],
            channels=[],
        )
        result = _drive(
            ",".join(targets),
            [p.pid for p in procs],
            token,
            skus=SPREAD // 2 if kits else SPREAD if spread else 1,
            clients=clients,
            seconds=seconds,
            op=op,
            sku_prefix="K" if kits else "B",
        )
        counted = [b for b in (_batch_sizes(m) for m in metrics_ports) if b]
    finally:
        stop_processes(procs, timeout=30)
    result["servers"] = servers
    if counted:
        batches, requests = sum(b for b, _ in counted), sum(r for _, r in counted)
        result["batches"], result["avg_batch"] = batches, round(requests / max(batches, 1), 2)
    if op != "reserve":
        return result

    async def verify() -> dict[str, Any]:
        engine = make_engine(url, pool_size=1, max_overflow=0)
        try:
            if kits:
                return await check_no_oversell(
                    make_session_factory(engine), result["ok"] * KIT_UNITS, result["ok"] * KIT_LEDGER_ROWS
                )
            return await check_no_oversell(make_session_factory(engine), result["ok"])
        finally:
            await engine.dispose()

    result.update(asyncio.run(verify()))
    return result
