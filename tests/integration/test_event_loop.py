"""ENTREPOT_EVENT_LOOP chooses the server process's event loop, and either serves."""

from __future__ import annotations

import pytest

from entrepot.platform.v1 import channel_pb2
from entrepot_client import EntrepotSync
from tests.procs import ServerProcess


def _loaded(pid: int, library: str) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        return library in maps.read()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_setting_chooses_the_loop_and_the_server_serves(database_url: str, make_token, loop: str) -> None:
    with ServerProcess(database_url, ENTREPOT_EVENT_LOOP=loop) as server:
        assert server.proc is not None
        assert _loaded(server.proc.pid, "uvloop") is (loop == "uvloop")
        with EntrepotSync(server.target, make_token(["channel.read"])) as client:
            response = client.channel.list_channels(channel_pb2.ListChannelsRequest())
            assert isinstance(response, channel_pb2.ListChannelsResponse)


def test_uvloop_is_the_default(database_url: str) -> None:
    with ServerProcess(database_url) as server:
        assert server.proc is not None
        assert _loaded(server.proc.pid, "uvloop")
