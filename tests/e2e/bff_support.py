"""Helpers for the TypeScript client and BFF tests: building, running node, HTTP and SSE."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[2]
TS = ROOT / "clients" / "typescript"


async def run(*cmd: str, cwd: Path = ROOT) -> str:
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out.decode()[-3000:]}"
    return out.decode()


async def read_json_line(stream: asyncio.StreamReader, timeout: float = 20.0) -> dict[str, Any]:
    line = await asyncio.wait_for(stream.readline(), timeout)
    assert line, "the node process closed its output early"
    result: dict[str, Any] = json.loads(line)
    return result


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any


def request(
    method: str, url: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> Reply:
    data = json.dumps(body).encode() if body is not None else None
    hdrs = {"content-type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            raw = resp.read()
            return Reply(
                resp.status, {k.lower(): v for k, v in resp.headers.items()}, json.loads(raw) if raw else None
            )
    except urllib.error.HTTPError as err:
        raw = err.read()
        return Reply(
            err.code, {k.lower(): v for k, v in err.headers.items()}, json.loads(raw) if raw else None
        )


@dataclass
class SseEvent:
    event: str
    id: str | None
    data: Any


@dataclass
class Sse:
    """A blocking server-sent-events reader (call its methods through asyncio.to_thread)."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    comments: int = 0

    def __post_init__(self) -> None:
        u = urlsplit(self.url)
        self.conn = HTTPConnection(u.hostname or "", u.port, timeout=20)
        self.conn.request("GET", u.path + (f"?{u.query}" if u.query else ""), headers=self.headers)
        self.resp = self.conn.getresponse()
        self.status = self.resp.status

    def next(self) -> SseEvent:
        """The next event; comments (`: heartbeat`) and `retry:` lines are counted and skipped."""
        event, ident, data = "message", None, list[str]()
        while True:
            line = self.resp.readline()
            assert line, "the event stream ended"
            text = line.decode().rstrip("\n")
            if not text:
                if data:
                    return SseEvent(event, ident, json.loads("\n".join(data)))
                event, ident = "message", None
                continue
            name, _, value = text.partition(":")
            value = value.removeprefix(" ")
            if name == "":
                self.comments += 1
            elif name == "event":
                event = value
            elif name == "id":
                ident = value
            elif name == "data":
                data.append(value)

    def close(self) -> None:
        self.conn.close()


async def start_node(script: str, env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    """node clients/typescript/dist/<script> args with `env` on top of ours; stdin, stdout and stderr piped."""
    return await asyncio.create_subprocess_exec(
        "node",
        str(TS / "dist" / script),
        *args,
        env={**os.environ, **env},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@asynccontextmanager
async def bff_process(target: str, token: str, channel: str, **env: str) -> AsyncIterator[str]:
    """node dist/bff/server.js on a free port; yields its base URL; stops it afterwards."""
    proc = await start_node(
        "bff/server.js",
        {
            "ENTREPOT_TARGET": target,
            "ENTREPOT_TOKEN": token,
            "ENTREPOT_CHANNEL": channel,
            "BFF_PORT": "0",
            **env,
        },
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        yield str((await read_json_line(proc.stdout))["listening"])
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)
        err = (await proc.stderr.read()).decode()
        assert proc.returncode == 0, f"the BFF exited with {proc.returncode}:\n{err[-2000:]}"


BFF_PERMISSIONS = [
    "inventory.read",
    "inventory.watch",
    "channel.read",
    "cart.read",
    "cart.write",
    "cart.checkout",
]
