"""The README's run command, as a user runs it: `entrepot dev` from nothing.

Embedded PostgreSQL and Temporal's dev server come from wheels; the test
reads the printed token, makes a call with the installed client, then stops
everything with SIGTERM (what Ctrl-C does)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from entrepot.platform.v1 import channel_pb2
from entrepot_client import EntrepotSync
from server.devservices import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_dev_starts_everything_serves_and_stops_cleanly() -> None:
    # Inside the repo, not pytest's 0700 tmp dir: embedded PostgreSQL runs as its own
    # system user (when started as root) and must be able to reach its data directory.
    tmp_path = ROOT / ".entrepot" / f"e2e-dev-{uuid.uuid4().hex[:8]}"
    tmp_path.mkdir(parents=True)
    try:
        _run_dev(tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _run_dev(tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "TEMPORAL_ADDRESS")}
    env["ENTREPOT_DATA_DIR"] = str(tmp_path / "data")
    cmd = [sys.executable, "-m", "server.cli", "dev", "--listen", listen]
    cmd += ["--metrics-port", str(free_port()), "--temporal-port", str(free_port())]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    token = ""
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            if m := re.search(r"export ENTREPOT_TOKEN=(\S+)", line):
                token = m.group(1)
            if "Ctrl-C stops everything" in line:
                break
            assert time.monotonic() - started < 120, "".join(output)
        assert token, "".join(output)
        ready = next(line for line in output if "healthy after" in line)
        print(ready.strip())
        with EntrepotSync(listen, token, "default") as ep:
            slugs = [c.slug for c in ep.channel.list_channels(channel_pb2.ListChannelsRequest()).channels]
        assert "default" in slugs
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    rest = proc.stdout.read() if proc.stdout else ""
    assert code == 0, "".join(output) + rest
    assert "stopped" in rest
    assert not (tmp_path / "data" / "dev" / "pg" / "postmaster.pid").exists()
