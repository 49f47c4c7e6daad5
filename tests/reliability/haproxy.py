"""HAProxy from Debian in front of `entrepot serve` replicas, as R10 runs it.

- h2c to each replica (`proto h2`), round robin per request;
- a gRPC health check per replica every CHECK_MS: grpc.health.v1.Health/Check sent over h2c and
  the replica taken out when the answer is not SERVING (a draining replica answers NOT_SERVING
  at once) or does not come within CHECK_TIMEOUT_MS. HAProxy 2.6's `http-check send` cannot send
  a body holding NUL bytes, which every gRPC message frame does, so the check is a `tcp-check`
  sending the HTTP/2 frames itself (connection preface, SETTINGS, HEADERS, DATA) and expecting
  the SERVING response message;
- retries only where the request cannot have reached a replica: connect failures and
  refused streams (`retry-on conn-failure`), on the other replica;
- a stats socket (`show stat`) for each replica's state and request count.

`make test` installs the package (scripts/ensure-debian-package.sh); without it the test fails with
one line saying what to install.
"""

from __future__ import annotations

import csv
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from server.devservices import free_port, stop_processes

CHECK_MS = 200
CHECK_TIMEOUT_MS = 300
# Longest time from a replica turning NOT_SERVING to HAProxy taking it out (fall 1): the check
# that just started before it plus that check's timeout, plus the next check and its timeout.
DETECTION_SECONDS = (2 * CHECK_MS + 2 * CHECK_TIMEOUT_MS) / 1000


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if not found:
        pytest.fail(
            "haproxy is not installed: apt-get install haproxy (make test does it as root)", pytrace=False
        )
    return found


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _header(index: int, value: bytes) -> bytes:
    """HPACK literal without indexing, name from the static table, value not Huffman-coded."""
    prefix = bytes([index]) if index < 15 else bytes([15, index - 15])
    return prefix + bytes([len(value)]) + value


def grpc_health_check_request() -> bytes:
    """An h2c connection's first bytes carrying one unary Health/Check for service ""."""
    headers = (
        b"\x83"  # :method POST
        + b"\x86"  # :scheme http
        + _header(4, b"/grpc.health.v1.Health/Check")  # :path
        + _header(1, b"localhost")  # :authority
        + _header(31, b"application/grpc")  # content-type
        + b"\x00\x02te\x08trailers"  # te: trailers (not in the static table)
    )
    return (
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + _frame(0x4, 0x0, 0)  # SETTINGS (defaults)
        + _frame(0x1, 0x4, 1, headers)  # HEADERS, END_HEADERS
        + _frame(0x0, 0x1, 1, b"\x00" + struct.pack(">I", 0))  # DATA, END_STREAM: empty request
    )


# The response message: not compressed, 2 bytes, field 1 (status) = 1 (SERVING).
SERVING_RESPONSE = b"\x00" + struct.pack(">I", 2) + b"\x08\x01"


class HAProxy:
    def __init__(self, workdir: Path, replicas: dict[str, int]) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.replicas = replicas
        self.config_path = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        self.stats_socket = workdir / "haproxy.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        servers = "\n".join(f"    server {name} 127.0.0.1:{port}" for name, port in self.replicas.items())
        return f"""global
    nbthread 1
    log stderr format raw local0 info
    stats socket {self.stats_socket} mode 600 level admin

defaults
    mode http
    log global
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout check {CHECK_TIMEOUT_MS}ms
    retries 3
    option redispatch 1
    retry-on conn-failure

frontend grpc
    bind 127.0.0.1:{self.port} proto h2
    default_backend entrepot

backend entrepot
    balance roundrobin
    option tcp-check
    tcp-check connect
    tcp-check send-binary {grpc_health_check_request().hex()}
    tcp-check expect binary {SERVING_RESPONSE.hex()}
    default-server proto h2 check inter {CHECK_MS} fall 1 rise 1
{servers}
"""

    def start(self) -> HAProxy:
        binary = haproxy_binary()
        self.config_path.write_text(self.config())
        checked = subprocess.run([binary, "-c", "-f", str(self.config_path)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([binary, "-db", "-f", str(self.config_path)], stdout=log, stderr=log)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_processes([self.proc], timeout=5)

    def stats(self) -> dict[str, dict[str, str]]:
        """`show stat` of the backend's servers: name -> columns (status, stot, ...)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(self.stats_socket))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().lstrip("# ").splitlines()
        rows = csv.DictReader(line for line in lines if line)
        return {r["svname"]: r for r in rows if r["pxname"] == "entrepot" and r["svname"] in self.replicas}

    def wait_status(self, name: str, status: str, timeout: float) -> float:
        """Seconds until HAProxy reports replica `name` in `status` (UP, DOWN)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            assert self.proc is not None and self.proc.poll() is None, self.log_tail()
            if self.stats_socket.exists() and self.stats()[name]["status"] == status:
                return time.monotonic() - start
            time.sleep(0.05)
        raise TimeoutError(f"HAProxy did not see {name} {status} within {timeout}s\n{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""
