"""Per-call context set by the interceptors and read by servicers."""

from __future__ import annotations

from contextvars import ContextVar

from domain.shared.caller import Caller, ChannelRef
from domain.shared.errors import FailedPrecondition

_caller: ContextVar[Caller | None] = ContextVar("entrepot_caller", default=None)
_channel: ContextVar[ChannelRef | None] = ContextVar("entrepot_channel", default=None)
_method: ContextVar[str] = ContextVar("entrepot_method", default="")


def current_caller() -> Caller:
    caller = _caller.get()
    if caller is None:  # only reachable if a service is served without the auth interceptor
        raise RuntimeError("no authenticated caller in this context")
    return caller


def current_channel() -> ChannelRef:
    channel = _channel.get()
    if channel is None:
        raise FailedPrecondition("CHANNEL_REQUIRED", "this call needs the x-channel-slug metadata")
    return channel


def bound_channel() -> ChannelRef | None:
    """The channel the call is bound to, if any (the idempotency hash covers it)."""
    return _channel.get()


def current_method() -> str:
    return _method.get()
