"""Real `entrepot serve` processes for tests that need several replicas, restarts or SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.auth import mint_token
from server.devservices import free_port, stop_processes
from server.settings import Settings
from tests.conftest import TEST_SECRET

ROOT = Path(__file__).resolve().parent.parent


# For tests that run replicas beside many connections of their own: all of them stay well
# under the database's max_connections.
SMALL_POOL = {"ENTREPOT_DB_POOL_SIZE": "5", "ENTREPOT_DB_MAX_OVERFLOW": "5"}


def server_token(
    sub: str = "reliability",
    permissions: Sequence[str] = ("*",),
    ttl: int = 3600,
    status_namespaces: Sequence[str] = (),
) -> str:
    """A token for these servers (signed with their secret), every channel."""
    return mint_token(
        Settings(jwt_hs256_secret=TEST_SECRET),
        sub=sub,
        permissions=list(permissions),
        channels=["*"],
        status_namespaces=list(status_namespaces),
        ttl_seconds=ttl,
    )


class ServerProcess:
    """`python -m server.cli serve` on a free loopback port against `database_url`, the same
    port across a kill and a restart. With `log_dir` its output goes to
    `log_dir/server-<port>.log`: a pipe nobody reads fills up under a flood of warnings (the
    database down) and blocks the server, which is not what those tests test. Without it,
    stderr is a pipe, read when the server exits before it serves."""

    def __init__(
        self,
        database_url: str,
        log_dir: Path | None = None,
        *,
        temporal_address: str | None = None,
        **env: str,
    ) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log" if log_dir else None
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "TEMPORAL_ADDRESS"},
            "DATABASE_URL": database_url,
            "ENTREPOT_LISTEN": self.target,
            "ENTREPOT_METRICS_PORT": "0",
            "ENTREPOT_JWT_HS256_SECRET": TEST_SECRET,
            "ENTREPOT_ACCESS_LOG": "false",
            "ENTREPOT_LOG_LEVEL": "WARNING",
            "ENTREPOT_GRACE_SECONDS": "2",
            "ENTREPOT_SHUTDOWN_DELAY_SECONDS": "0",
            **env,
        }
        if temporal_address:
            self.env["TEMPORAL_ADDRESS"] = temporal_address
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def launch(self) -> None:
        """Start the process without waiting for it to serve."""
        log: IO[bytes] | int = self.log_path.open("ab") if self.log_path else subprocess.PIPE
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve"], env=self.env, cwd=ROOT, stderr=log
        )
        if not isinstance(log, int):
            log.close()  # the child holds its own descriptor
        self.starts += 1

    def start(self, timeout: float = 30.0) -> ServerProcess:
        """Start and wait until health says SERVING."""
        self.launch()
        self.wait_serving(timeout)
        return self

    def _exited(self) -> str | None:
        assert self.proc is not None
        if self.proc.poll() is None:
            return None
        return f"server on {self.target} exited with {self.proc.returncode}:\n{self.log_tail()}"

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if exited := self._exited():
                    raise RuntimeError(exited)
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"server on {self.target} not serving after {timeout}s:\n{self.log_tail()}")

    async def ready(self, timeout: float = 60.0) -> None:
        """wait_serving for async tests: the event loop keeps running meanwhile."""
        deadline = time.monotonic() + timeout
        async with grpc.aio.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if exited := self._exited():
                    raise RuntimeError(exited)
                try:
                    r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.2)
        raise TimeoutError(f"server on {self.target} not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        if self.log_path is not None:
            return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""
        if self.proc is not None and self.proc.stderr is not None and self.proc.poll() is not None:
            return self.proc.stderr.read().decode(errors="replace")[-n:]
        return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup, like a crash or an OOM kill."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    async def restart(self) -> None:
        """SIGKILL, then start again on the same port."""
        self.kill()
        self.launch()
        await self.ready()

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait: the graceful path. Returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """SIGTERM, and SIGKILL whatever has not exited after 15 s."""
        if self.proc is not None:
            stop_processes([self.proc], timeout=15)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
