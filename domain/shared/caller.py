"""Who is calling, and for which channel: passed explicitly into the domain."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Caller:
    subject: str
    permissions: frozenset[str] = frozenset()
    # Channel slugs the token allows; "*" allows all.
    channels: frozenset[str] = frozenset()
    # Order-status namespaces the caller may write (e.g. "procurement").
    status_namespaces: frozenset[str] = frozenset()

    def has(self, permission: str) -> bool:
        return permission in self.permissions or "*" in self.permissions

    def may_use_channel(self, slug: str) -> bool:
        return "*" in self.channels or slug in self.channels


@dataclass(frozen=True)
class ChannelRef:
    """The channel a call was made for, resolved and checked by the server."""

    slug: str
    currency: str
    timezone: str
    active: bool = True
    extra: dict[str, str] = field(default_factory=dict, compare=False)
