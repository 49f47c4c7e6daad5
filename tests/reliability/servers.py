"""Real server processes for reliability tests: `python -m server.cli serve`,
killed with SIGKILL and restarted on the same port."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.auth import mint_token
from server.devservices import free_port, stop_processes
from tests.conftest import TEST_SECRET, make_settings

ROOT = Path(__file__).resolve().parents[2]


def admin_token(database_url: str) -> str:
    settings = make_settings(database_url, None)
    return mint_token(settings, sub="reliability", permissions=["*"], channels=["*"], status_namespaces=[])


class ServerProcess:
    def __init__(self, database_url: str, log_dir: Path, port: int | None = None, **env: str) -> None:
        self.database_url = database_url
        self.port = port or free_port()
        self.log_path = log_dir / f"server-{self.port}.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        env = dict(os.environ)
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "ENTREPOT_JWT_HS256_SECRET": TEST_SECRET,
                "ENTREPOT_LISTEN": self.target,
                "ENTREPOT_METRICS_PORT": "0",
                "ENTREPOT_ACCESS_LOG": "false",
                "ENTREPOT_DB_POOL_SIZE": "5",
                "ENTREPOT_DB_MAX_OVERFLOW": "5",
            }
        )
        env.pop("TEMPORAL_ADDRESS", None)
        env.update(self.env)
        log = open(self.log_path, "ab")  # handed to the child process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve"], cwd=ROOT, env=env, stdout=log, stderr=log
        )
        log.close()
        self.starts += 1

    async def ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                async with grpc.aio.insecure_channel(self.target) as ch:
                    resp = await health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=1.0
                    )
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
        raise TimeoutError(f"server on {self.target} not ready; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL: no graceful anything, like a crash or an OOM kill."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    async def restart(self) -> None:
        self.kill()
        self.start()
        await self.ready()

    def stop(self) -> None:
        if self.proc is not None:
            stop_processes([self.proc], timeout=15)
