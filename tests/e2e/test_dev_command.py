"""The README's run command as a user runs it: `entrepot dev` from nothing, and the tools
next to it (`entrepot token`, the client CLI, `make run ARGS=...`).

Embedded PostgreSQL and Temporal's dev server come from wheels. Every command runs as a
subprocess; the assertions are on what a user sees (exit code, the one line it printed,
never a traceback) and on what is left running afterwards: every process whose
environment names the test's ENTREPOT_DATA_DIR (server, worker, Temporal, PostgreSQL)
must be gone. `entrepot dev` runs in its own session, so a Ctrl-C is simulated the way a
terminal sends it: SIGINT to the whole foreground process group.

One instance serves the module (started once, stopped by the last test with two quick
Ctrl-Cs); the startup interruptions share one more data directory.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from entrepot.platform.v1 import channel_pb2
from entrepot_client import EntrepotSync
from server.devservices import free_port, postgres_pid

ROOT = Path(__file__).resolve().parents[2]
ENTREPOT = [sys.executable, "-m", "server.cli"]
CLIENT = [sys.executable, "-m", "entrepot_client.cli"]


def _data_dir(tag: str) -> Path:
    # Inside the repo, not pytest's 0700 tmp dir: embedded PostgreSQL runs as its own
    # system user (when started as root) and must be able to reach its data directory.
    path = ROOT / ".entrepot" / f"e2e-{tag}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def _env(data: Path, **extra: str) -> dict[str, str]:
    drop = (
        "DATABASE_URL",
        "TEMPORAL_ADDRESS",
        "ENTREPOT_JWT_HS256_SECRET",
        "ENTREPOT_TARGET",
        "ENTREPOT_TOKEN",
    )
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "ENTREPOT_DATA_DIR": str(data), **extra}


def survivors(data: Path) -> list[str]:
    """Processes whose environment names this data directory (everything `dev` started)."""
    marker = f"ENTREPOT_DATA_DIR={data}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry.name}: {cmd[:200]}")
        except OSError:
            continue  # exited meanwhile, or a kernel thread
    return found


@dataclass
class Dev:
    """`entrepot dev` in its own session, its output collected by a thread."""

    data: Path
    args: list[str]
    proc: subprocess.Popen[str] = field(init=False)
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.proc = subprocess.Popen(
            [*ENTREPOT, "dev", *self.args],
            cwd=ROOT,
            env=_env(self.data),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert self.proc.poll() is None, (
                f"dev exited ({self.proc.returncode}) before {text!r}:\n{self.output}"
            )
            assert time.monotonic() < deadline, f"no {text!r} after {timeout}s:\n{self.output}"
            time.sleep(0.05)

    def ctrl_c(self, times: int = 1, gap: float = 0.3) -> int:
        """SIGINT to the process group, as a terminal does; returns the exit code."""
        for i in range(times):
            if i:
                time.sleep(gap)
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGINT)
        code = self.proc.wait(90)
        self.reader.join(10)
        return code

    def assert_stopped_cleanly(self, code: int) -> None:
        assert code == 0, self.output
        assert "Traceback" not in self.output, self.output
        assert "Fatal Python error" not in self.output, self.output
        assert self.output.rstrip().endswith("stopped"), self.output
        left = survivors(self.data)
        assert not left, f"left running: {left}\n{self.output}"
        assert postgres_pid(self.data / "dev" / "pg") is None

    def value(self, name: str) -> str:
        m = re.search(rf"export {name}=(\S+)", self.output)
        assert m, self.output
        return m.group(1)


def run(cmd: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def one_line_failure(done: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The command failed with `code` and said why in exactly one line, without a traceback."""
    said = done.stdout + done.stderr
    assert done.returncode == code, said
    assert "Traceback" not in said, said
    assert len(done.stderr.strip().splitlines()) == 1, said
    return done.stderr.strip()


def ports() -> dict[str, int]:
    return {k: free_port() for k in ("listen", "metrics", "temporal", "ui", "nats")}


def dev_args(p: dict[str, int]) -> list[str]:
    return [
        "--listen",
        f"127.0.0.1:{p['listen']}",
        "--metrics-port",
        str(p["metrics"]),
        "--temporal-port",
        str(p["temporal"]),
        "--temporal-ui-port",
        str(p["ui"]),
        "--events",
        "--nats-port",
        str(p["nats"]),
    ]


@pytest.fixture(scope="module")
def dev() -> Iterator[Dev]:
    data = _data_dir("dev")
    p = ports()
    d = Dev(data, dev_args(p))
    d.ports = p  # type: ignore[attr-defined]
    try:
        d.wait_for("Ctrl-C stops everything")
        yield d
    finally:
        if d.proc.poll() is None:
            d.ctrl_c()
        shutil.rmtree(data, ignore_errors=True)


def test_dev_starts_everything_and_prints_where_it_listens(dev: Dev) -> None:
    p = dev.ports  # type: ignore[attr-defined]
    print(next(line for line in dev.lines if "healthy after" in line).strip())
    target = dev.value("ENTREPOT_TARGET")
    assert target == f"127.0.0.1:{p['listen']}"
    with EntrepotSync(target, dev.value("ENTREPOT_TOKEN"), "default") as ep:
        slugs = [c.slug for c in ep.channel.list_channels(channel_pb2.ListChannelsRequest()).channels]
    assert "default" in slugs
    # The Temporal web UI is on by default and its URL is printed.
    ui = f"http://127.0.0.1:{p['ui']}"
    assert f"Temporal UI: {ui}" in dev.output
    with urllib.request.urlopen(ui, timeout=10) as page:
        assert page.status == 200
        assert b"<html" in page.read(4096).lower()


def test_dev_events_relays_to_the_embedded_nats_and_the_printed_subscriber_sees_it(dev: Dev) -> None:
    """`--events`: the default channel's creation (an outbox event) reaches the embedded
    JetStream, and the subscription the banner prints shows it."""
    p = dev.ports  # type: ignore[attr-defined]
    url = f"nats://127.0.0.1:{p['nats']}"
    assert f"started NATS (JetStream) on 127.0.0.1:{p['nats']}" in dev.output
    assert f"events: every outbox event is published to {url}" in dev.output
    if shutil.which("nats"):
        # With the nats CLI installed the banner prints its command instead of a Python subscriber.
        assert f"nats --server {url} sub 'entrepot.>'" in dev.output, dev.output
        return
    text = dev.output
    snippet = text[text.index(".venv/bin/python - <<'EOF'\n") :].split("\n", 1)[1].split("\nEOF\n", 1)[0]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        subprocess.run(
            [sys.executable, "-"], input=snippet, cwd=ROOT, env=env, capture_output=True, text=True, timeout=8
        )
        raise AssertionError("the subscriber ended by itself")
    except subprocess.TimeoutExpired as stopped:
        seen = stopped.stdout if isinstance(stopped.stdout, str) else (stopped.stdout or b"").decode()
    assert "entrepot.channel.created.default " in seen, seen


def test_second_dev_on_the_same_data_is_refused_and_leaves_the_first_alone(dev: Dev) -> None:
    pg_before = postgres_pid(dev.data / "dev" / "pg")
    assert pg_before
    started = time.monotonic()
    done = run([*ENTREPOT, "dev", *dev_args(ports())], _env(dev.data))
    line = one_line_failure(done)
    assert time.monotonic() - started < 10, line
    assert f"pid {dev.proc.pid}" in line and dev.value("ENTREPOT_TARGET") in line, line
    # The first instance still owns and serves everything.
    assert postgres_pid(dev.data / "dev" / "pg") == pg_before
    with grpc.insecure_channel(dev.value("ENTREPOT_TARGET")) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert r.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("taken", "flag"),
    [
        ("listen", "--listen"),
        ("metrics", "--metrics-port"),
        ("temporal", "--temporal-port"),
        ("ui", "--temporal-ui-port"),
    ],
)
def test_a_taken_port_fails_fast_naming_the_port_and_the_flag(dev: Dev, taken: str, flag: str) -> None:
    data = _data_dir("ports")
    try:
        p = ports()
        p[taken] = dev.ports[taken]  # type: ignore[attr-defined]
        started = time.monotonic()
        line = one_line_failure(run([*ENTREPOT, "dev", *dev_args(p)], _env(data)))
        assert time.monotonic() - started < 10, line
        assert f"port {p[taken]} " in line and flag in line, line
        assert not survivors(data)
        assert not (data / "dev" / "pg").exists()  # refused before anything started
    finally:
        shutil.rmtree(data, ignore_errors=True)


def test_make_run_passes_args(dev: Dev) -> None:
    data = _data_dir("make")
    try:
        port = dev.ports["listen"]  # type: ignore[attr-defined]
        done = run(["make", "--no-print-directory", "run", f"ARGS=--listen 127.0.0.1:{port}"], _env(data))
        assert done.returncode != 0
        assert f"port {port} (gRPC" in done.stderr and "--listen" in done.stderr, done.stdout + done.stderr
        assert "Traceback" not in done.stdout + done.stderr
    finally:
        shutil.rmtree(data, ignore_errors=True)


def test_token_reads_the_dev_secret_and_says_when_there_is_none(dev: Dev) -> None:
    done = run([*ENTREPOT, "token", "--sub", "wms", "--permissions", "channel.read"], _env(dev.data))
    assert done.returncode == 0, done.stderr
    with EntrepotSync(dev.value("ENTREPOT_TARGET"), done.stdout.strip()) as ep:
        assert ep.channel.list_channels(channel_pb2.ListChannelsRequest()).channels
    nowhere = ROOT / ".entrepot" / f"e2e-none-{uuid.uuid4().hex[:8]}"
    line = one_line_failure(run([*ENTREPOT, "token"], _env(nowhere)))
    assert "ENTREPOT_JWT_HS256_SECRET" in line and "entrepot dev" in line, line


def test_client_cli_honours_the_target_and_prints_canonical_json(dev: Dev) -> None:
    env = _env(
        dev.data, ENTREPOT_TARGET=dev.value("ENTREPOT_TARGET"), ENTREPOT_TOKEN=dev.value("ENTREPOT_TOKEN")
    )
    done = run(
        [*CLIENT, "--channel", "default", "call", "cart.create_cart", '{"cart": {"customer_ref": "c1"}}'], env
    )
    assert done.returncode == 0, done.stderr
    assert '"state": "STATE_ACTIVE"' in done.stdout, done.stdout  # enum names
    assert '"itemCount": "0"' in done.stdout, done.stdout  # zero values shown
    assert '"approvalRequired": false' in done.stdout, done.stdout


def test_client_cli_failures_are_one_line(dev: Dev) -> None:
    env = _env(
        dev.data, ENTREPOT_TARGET=dev.value("ENTREPOT_TARGET"), ENTREPOT_TOKEN=dev.value("ENTREPOT_TOKEN")
    )
    line = one_line_failure(run([*CLIENT, "call", "inventory.get_stock_level", '{"sku": "A",}'], env), code=2)
    assert "inventory.v1.GetStockLevelRequest" in line and "column 13" in line, line
    line = one_line_failure(run([*CLIENT, "call", "inventory.get_stock_level", '{"skux": "A"}'], env), code=2)
    assert '"skux"' in line, line
    line = one_line_failure(run([*CLIENT, "call", "inventory.no_such_method"], env), code=2)
    assert "unknown method" in line, line
    line = one_line_failure(run([*CLIENT, "call", "inventory.get_stock_level", '{"sku": "NOPE"}'], env))
    assert '"error": "NOT_FOUND"' in line, line
    nobody = _env(dev.data, ENTREPOT_TARGET=f"127.0.0.1:{free_port()}")
    line = one_line_failure(run([*CLIENT, "call", "channel.list_channels"], nobody))
    assert "no server answered at" in line and nobody["ENTREPOT_TARGET"] in line, line
    # A reader that went away (`methods | head` once head has exited): the CLI's write finds
    # the pipe closed and it stops quietly with 141. The read end is closed before the CLI
    # writes, so the write always fails (a reader that reads a few lines first races with a
    # short output written whole, which rightly exits 0).
    proc = subprocess.Popen(
        [*CLIENT, "methods"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    code = proc.wait(30)
    err = proc.stderr.read().decode()
    assert code == 141, err
    assert err == "", err


def test_entrepot_commands_without_database_or_temporal_say_so_in_one_line(dev: Dev) -> None:
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/entrepot"
    env = {k: v for k, v in _env(dev.data).items() if k != "DATABASE_URL"}
    line = one_line_failure(run([*ENTREPOT, "migrate"], {**env, "DATABASE_URL": closed}))
    assert "cannot connect to the database" in line and "password" not in line, line
    line = one_line_failure(
        run([*ENTREPOT, "channel", "create", "x", "--name", "X"], {**env, "DATABASE_URL": closed})
    )
    assert "cannot connect to the database" in line, line
    line = one_line_failure(run([*ENTREPOT, "migrate"], env))
    assert "DATABASE_URL is not set" in line, line
    nowhere = {**env, "DATABASE_URL": closed, "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}"}
    line = one_line_failure(run([*ENTREPOT, "worker"], nowhere))
    assert "cannot reach Temporal" in line, line
    listen = dev.value("ENTREPOT_TARGET")
    line = one_line_failure(run([*ENTREPOT, "serve", "--listen", listen, "--metrics-port", "0"], env))
    assert f"port {listen.rsplit(':', 1)[1]} (gRPC" in line, line


def test_ctrl_c_twice_while_running_stops_everything(dev: Dev) -> None:
    """Last in the module: stops the shared instance."""
    code = dev.ctrl_c(times=2, gap=0.2)
    dev.assert_stopped_cleanly(code)
    assert "worker draining" in dev.output  # the worker drained before it exited


@pytest.mark.parametrize(
    "marker",
    [
        "starting embedded PostgreSQL",  # initdb / pg_ctl running (fresh data directory)
        "started Temporal dev server",  # migrations running
        "channel default created",  # server and worker starting
    ],
)
def test_ctrl_c_during_startup_stops_everything(startup_data: Path, marker: str) -> None:
    d = Dev(startup_data, dev_args(ports()))
    d.wait_for(marker)
    code = d.ctrl_c(times=2, gap=0.1)
    d.assert_stopped_cleanly(code)
    assert "Entrepot is serving" not in d.output


@pytest.fixture(scope="module")
def startup_data() -> Iterator[Path]:
    data = _data_dir("startup")
    yield data
    shutil.rmtree(data, ignore_errors=True)
