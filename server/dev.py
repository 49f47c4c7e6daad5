"""`entrepot dev`: everything on one machine with one command.

With no DATABASE_URL it runs embedded PostgreSQL (data in .entrepot/dev/pg,
kept across restarts); with no TEMPORAL_ADDRESS it runs Temporal's dev server
and its web UI (state in .entrepot/dev/temporal.db); with --events and no
NATS_URL it runs nats-server with JetStream (streams in .entrepot/dev/nats), and
the server relays every event there (docs/events.md). Then it migrates, makes
sure the `default` channel exists, starts the server and the worker, prints
where everything listens, a dev token and a first call, and stops every child
on Ctrl-C, SIGTERM or SIGHUP.

The data directory has one owner: `dev.lock` is held (flock) for the whole run
and names the running instance, so a second `entrepot dev` on the same
directory is refused before it touches anything. Every port is checked before
anything starts. The children run in their own sessions: a Ctrl-C in the
terminal reaches only this process, which stops them in order (server and
worker, then NATS and Temporal, then PostgreSQL); further Ctrl-Cs while stopping only
say so, so nothing is left running.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from pydantic import SecretStr

from server.cli import CommandError
from server.devservices import (
    port_in_use,
    postgres_pid,
    start_nats_server,
    start_temporal_dev_server,
    stop_process_group,
    stop_processes,
)


def dev_dir() -> Path:
    """Where `entrepot dev` keeps its data, lock and HS256 secret ($ENTREPOT_DATA_DIR/dev)."""
    return Path(os.environ.get("ENTREPOT_DATA_DIR", ".entrepot")).resolve() / "dev"


def read_dev_secret() -> str | None:
    """The HS256 secret `entrepot dev` made, None when it never ran here."""
    path = dev_dir() / "jwt-secret"
    return path.read_text().strip() if path.exists() else None


def dev_token(secret: str, sub: str, ttl_seconds: int) -> str:
    """A token with every permission, channel and status namespace, signed with the dev secret."""
    from server.auth import mint_token
    from server.settings import Settings

    settings = Settings(jwt_hs256_secret=SecretStr(secret))
    return mint_token(
        settings, sub=sub, permissions=["*"], channels=["*"], status_namespaces=["*"], ttl_seconds=ttl_seconds
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
    import asyncpg

    conn = await asyncpg.connect(_with_database(url, "postgres"))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def split_address(address: str, flag: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    try:
        return (host.strip("[]") or "0.0.0.0"), int(port)
    except ValueError:
        raise CommandError(f"{flag} {address!r}: expected HOST:PORT, e.g. 127.0.0.1:50051") from None


def require_free(host: str, port: int, what: str, flag: str) -> None:
    """One line naming the port and the flag that changes it, when something already holds it."""
    if port_in_use(host, port):
        raise CommandError(
            f"port {port} ({what}, {host}:{port}) is already in use: choose another with {flag}"
        )


def _lock(data: Path, info: dict[str, Any]) -> IO[str]:
    """Hold `dev.lock` for this run (released by the kernel however the process ends), or refuse
    with what the running instance wrote into it."""
    f = open(data / "dev.lock", "a+")  # held until run_dev returns
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        try:
            other = json.loads(f.read())
            who = f"pid {other['pid']}, serving on {other['listen']}"
        except (ValueError, KeyError, TypeError):
            who = "still starting"
        f.close()
        raise CommandError(
            f"another `entrepot dev` is running on {data} ({who}): use it, stop it, "
            "or give this one its own ENTREPOT_DATA_DIR and ports"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps(info))
    f.flush()
    return f


class _Stopped(Exception):
    """Ctrl-C, SIGTERM or SIGHUP arrived while starting."""


class _Signals:
    """The first SIGINT/SIGTERM/SIGHUP asks for a stop; later ones only say that it is under way.
    Handlers set a flag and never raise, so no step is cut short half-way (a child started but not
    yet recorded, initdb half done): the startup checks the flag between steps and in its waits."""

    def __init__(self) -> None:
        self.count = 0

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.count += 1
        if self.count > 1:  # os.write: print() is not safe inside a signal handler
            os.write(sys.stderr.fileno(), b"entrepot dev: already stopping, waiting for everything to exit\n")

    @property
    def stop(self) -> bool:
        return self.count > 0

    def check(self) -> None:
        if self.stop:
            raise _Stopped


class DevRun:
    def __init__(self, args: argparse.Namespace, data: Path, signals: _Signals) -> None:
        self.args = args
        self.data = data
        self.signals = signals
        self.env = dict(os.environ)
        # No load balancer to tell in dev: stop at once instead of waiting for one to notice.
        self.env.setdefault("ENTREPOT_SHUTDOWN_DELAY_SECONDS", "0")
        self.secret = self.env.get("ENTREPOT_JWT_HS256_SECRET") or _secret(data / "jwt-secret")
        self.env["ENTREPOT_JWT_HS256_SECRET"] = self.secret
        self.embedded_pg = not self.env.get("DATABASE_URL")
        self.embedded_temporal = not self.env.get("TEMPORAL_ADDRESS")
        self.ui_port = 0
        if self.embedded_temporal and args.temporal_ui_port != 0:
            self.ui_port = args.temporal_ui_port or args.temporal_port + 1000
        self.embedded_nats = args.events and not self.env.get("NATS_URL")
        self.pg_owned = False
        self.temporal: subprocess.Popen[bytes] | None = None
        self.nats: subprocess.Popen[bytes] | None = None
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.entrepot = [sys.executable, "-m", "server.cli"]

    def check_ports(self) -> None:
        host, port = split_address(self.args.listen, "--listen")
        require_free(host, port, "gRPC", "--listen")
        if self.args.metrics_port:
            metrics_host = self.env.get("ENTREPOT_METRICS_HOST", "127.0.0.1")
            require_free(metrics_host, self.args.metrics_port, "metrics", "--metrics-port")
        if self.embedded_temporal:
            require_free("127.0.0.1", self.args.temporal_port, "Temporal", "--temporal-port")
            if self.ui_port:
                require_free("127.0.0.1", self.ui_port, "Temporal UI", "--temporal-ui-port")
        if self.embedded_nats:
            require_free("127.0.0.1", self.args.nats_port, "NATS", "--nats-port")

    def run_step(
        self, name: str, cmd: list[str], *, capture: bool = False, interruptible: bool = True
    ) -> str:
        """Run a command to completion in its own session; a stop request ends it (when
        interruptible) or waits for it (initdb, pg_ctl: cut short, they leave a broken data dir)."""
        proc = subprocess.Popen(
            cmd, env=self.env, stdout=subprocess.PIPE if capture else None, text=True, start_new_session=True
        )
        while True:
            try:
                proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if interruptible and self.signals.stop:
                    stop_processes([proc], timeout=10)
                    raise _Stopped from None
        out = proc.stdout.read() if proc.stdout else ""
        if proc.returncode != 0:
            raise CommandError(f"{name} failed with exit code {proc.returncode}")
        return out.strip()

    def start_postgres(self) -> None:
        pgdata = self.data / "pg"
        left = postgres_pid(pgdata)
        if left:
            # The lock proves no `entrepot dev` owns it: an earlier run ended without stopping it.
            print(f"PostgreSQL (pid {left}) was left running on {pgdata}: using it, it stops with this run")
        else:
            print(f"starting embedded PostgreSQL (data in {pgdata}) ...", flush=True)
        self.pg_owned = True  # set first: an interrupted start is still stopped
        url = self.run_step(
            "starting PostgreSQL",
            [sys.executable, "-m", "server.devservices", "postgres-start", str(pgdata)],
            capture=True,
            interruptible=False,
        )
        self.signals.check()
        asyncio.run(_create_database_if_missing(url, "entrepot"))
        self.env["DATABASE_URL"] = _with_database(url, "entrepot")

    def start_temporal(self) -> None:
        port = self.args.temporal_port
        try:
            self.temporal = start_temporal_dev_server(
                self.data / "temporal.db",
                port=port,
                ui_port=self.ui_port or None,
                log_file=self.data / "temporal.log",
                abort=lambda: self.signals.stop,
            )
        except (RuntimeError, TimeoutError) as err:
            raise CommandError(str(err)) from None
        self.signals.check()
        self.env["TEMPORAL_ADDRESS"] = f"127.0.0.1:{port}"
        print(f"started Temporal dev server on 127.0.0.1:{port}", flush=True)

    def start_nats(self) -> None:
        port = self.args.nats_port
        try:
            self.nats = start_nats_server(
                self.data / "nats",
                port=port,
                log_file=self.data / "nats.log",
                abort=lambda: self.signals.stop,
            )
        except (RuntimeError, TimeoutError) as err:
            raise CommandError(str(err)) from None
        self.signals.check()
        self.env["NATS_URL"] = f"nats://127.0.0.1:{port}"
        print(f"started NATS (JetStream) on 127.0.0.1:{port}", flush=True)

    def spawn(self, name: str, cmd: list[str]) -> None:
        self.children[name] = subprocess.Popen(cmd, env=self.env, start_new_session=True)

    def exited_child(self) -> str | None:
        for name, proc in self.children.items():
            if proc.poll() is not None:
                return f"the {name} (pid {proc.pid}) exited with code {proc.returncode}"
        return None

    @staticmethod
    def _serving(stub: Any) -> bool:
        """Does the server answer SERVING? An RPC error means it is not listening yet."""
        import grpc
        from grpc_health.v1 import health_pb2

        try:
            r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.RpcError:
            return False
        return bool(r.status == health_pb2.HealthCheckResponse.SERVING)

    def wait_serving(self, timeout: float) -> None:
        import grpc
        from grpc_health.v1 import health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.args.listen) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                self.signals.check()
                if problem := self.exited_child():
                    raise CommandError(f"{problem} while starting")
                if self._serving(stub):
                    return
                if time.monotonic() > deadline:
                    raise CommandError(
                        f"the server on {self.args.listen} is not healthy after {timeout:.0f}s"
                    )
                time.sleep(0.2)

    def start(self) -> None:
        started = time.monotonic()
        if self.embedded_pg:
            self.start_postgres()
        if self.embedded_temporal:
            self.start_temporal()
        if self.embedded_nats:
            self.start_nats()
        self.run_step("entrepot migrate", [*self.entrepot, "migrate"])
        create = ["channel", "create", "default", "--name", "Default", "--currency", "EUR", "--if-missing"]
        self.run_step("entrepot channel create", [*self.entrepot, *create])
        serve = ["serve", "--listen", self.args.listen, "--metrics-port", str(self.args.metrics_port)]
        self.spawn("server", [*self.entrepot, *serve])
        if not self.args.no_worker:
            self.spawn("worker", [*self.entrepot, "worker"])
        self.wait_serving(60)
        self.banner(time.monotonic() - started)

    def banner(self, took: float) -> None:
        token = dev_token(self.secret, sub="dev", ttl_seconds=86400)
        lines = [f"\nEntrepot is serving on {self.args.listen} (healthy after {took:.1f}s)"]
        if self.args.metrics_port:
            lines.append(f"metrics: http://127.0.0.1:{self.args.metrics_port}/metrics")
        if self.ui_port:
            lines.append(f"Temporal UI: http://127.0.0.1:{self.ui_port}")
        lines += [
            "",
            "in another shell (entrepot demo, entrepot token and the client read these):",
            f"  export ENTREPOT_TARGET={self.args.listen}",
            f"  export ENTREPOT_TOKEN={token}",
            "  (the token: 24 h, every permission, every channel)",
            "",
            "first call:",
            "  .venv/bin/python -m entrepot_client.cli --channel default call channel.list_channels",
            "",
        ]
        lines += self.events_lines()
        lines.append("Ctrl-C stops everything.\n")
        print("\n".join(lines), flush=True)

    def events_lines(self) -> list[str]:
        """How to watch the events the relay publishes, when it runs."""
        url = self.env.get("NATS_URL")
        if not url:
            return []
        prefix = self.env.get("ENTREPOT_EVENTS_SUBJECT_PREFIX", "entrepot")
        stream = self.env.get("ENTREPOT_EVENTS_STREAM", "ENTREPOT")
        lines = [f"events: every outbox event is published to {url}, stream {stream}, subjects {prefix}.>"]
        if shutil.which("nats"):
            lines.append(f"  live: nats --server {url} sub '{prefix}.>'")
            lines.append(f"  stored (from the start): nats --server {url} stream view {stream}")
        else:
            lines += [
                "  subscribe from the start of the stream (no `nats` CLI here; in another shell):",
                ".venv/bin/python - <<'EOF'",
                "import asyncio, nats",
                "async def main():",
                f"    nc = await nats.connect('{url}')",
                f"    sub = await nc.jetstream().subscribe('{prefix}.>', ordered_consumer=True)",
                "    async for m in sub.messages:",
                "        print(m.subject, m.data.decode())",
                "asyncio.run(main())",
                "EOF",
            ]
        return [*lines, ""]

    def serve_until_stopped(self) -> int:
        while not self.signals.stop:
            if problem := self.exited_child():
                print(f"entrepot dev: {problem}; stopping everything", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.3)
        return 0

    def shutdown(self) -> None:
        stop_processes(list(self.children.values()), timeout=20)
        if self.nats is not None:
            stop_process_group(self.nats, timeout=10)
        if self.temporal is not None:
            stop_process_group(self.temporal, timeout=10)
        if self.pg_owned:
            pgdata = self.data / "pg"
            stop = [sys.executable, "-m", "server.devservices", "postgres-stop", str(pgdata)]
            self.run_step("stopping PostgreSQL", stop, interruptible=False)
        print("stopped", flush=True)


def run_dev(args: argparse.Namespace) -> int:
    signals = _Signals()
    signals.install()  # first: a Ctrl-C at any later moment is handled, never a traceback
    data = dev_dir()
    data.mkdir(parents=True, exist_ok=True)
    lock = _lock(data, {"pid": os.getpid(), "listen": args.listen})
    try:
        run = DevRun(args, data, signals)
        run.check_ports()  # before anything starts: nothing to stop when one is taken
        try:
            run.start()
            return run.serve_until_stopped()
        except _Stopped:
            return 0
        finally:
            run.shutdown()
    finally:
        lock.close()
