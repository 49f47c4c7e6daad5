"""entrepot_client.errors.from_rpc_error: typed errors from failed calls."""

from __future__ import annotations

import grpc
from grpc.aio import AioRpcError, Metadata

from entrepot_client.errors import InternalError, UnavailableError, from_rpc_error


def _failed(code: grpc.StatusCode, details: str) -> AioRpcError:
    return AioRpcError(code, Metadata(), Metadata(), details=details)


def test_a_connection_broken_under_a_write_is_unavailable_not_internal() -> None:
    # What grpc core reports for a stream whose server was SIGKILLed mid-write (R3).
    err = from_rpc_error(_failed(grpc.StatusCode.INTERNAL, "Internal error from Core"))
    assert isinstance(err, UnavailableError)
    assert err.code == grpc.StatusCode.UNAVAILABLE


def test_an_internal_error_from_the_server_stays_internal() -> None:
    err = from_rpc_error(_failed(grpc.StatusCode.INTERNAL, "internal error; see the server log"))
    assert isinstance(err, InternalError)
