"""Real `entrepot serve` processes for tests that need several replicas, restarts or SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.devservices import free_port
from tests.conftest import TEST_SECRET

ROOT = Path(__file__).resolve().parent.parent


class ServerProcess:
    """`python -m server.cli serve` on a free loopback port, against `database_url`."""

    def __init__(self, database_url: str, temporal_address: str | None = None, **env: str) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
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

    def start(self, timeout: float = 30.0) -> ServerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve"], env=self.env, cwd=ROOT, stderr=subprocess.PIPE
        )
        self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError(f"server exited with {self.proc.returncode}: {err[-2000:]}")
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"server on {self.target} not serving after {timeout}s")

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup (crash simulation)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait: the graceful path. Returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
