"""Channels: sales channels / tenants."""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from domain.platform.models import ChannelRow
from domain.shared.caller import ChannelRef
from domain.shared.errors import AlreadyExists, NotFound, Violations
from domain.shared.money import is_currency
from domain.shared.outbox import Event, emit
from domain.shared.pagination import decode_token, encode_token, page_size

SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
UPDATABLE = ("name", "currency", "timezone", "active")


@dataclass(frozen=True)
class Channel:
    slug: str
    name: str
    currency: str
    timezone: str
    active: bool
    created_at: datetime
    updated_at: datetime

    def ref(self) -> ChannelRef:
        return ChannelRef(slug=self.slug, currency=self.currency, timezone=self.timezone, active=self.active)


def _to_channel(row: ChannelRow) -> Channel:
    return Channel(row.slug, row.name, row.currency, row.timezone, row.active, row.created_at, row.updated_at)


def _validate(v: Violations, name: str, currency: str, timezone: str, prefix: str = "channel.") -> None:
    if not name.strip() or len(name) > 200:
        v.add(prefix + "name", "must be 1 to 200 characters")
    if not is_currency(currency):
        v.add(prefix + "currency", f"{currency!r} is not a supported ISO-4217 code")
    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        v.add(prefix + "timezone", f"{timezone!r} is not an IANA time zone")


async def create_channel(
    session: AsyncSession, *, slug: str, name: str, currency: str, timezone: str, active: bool = True
) -> Channel:
    v = Violations()
    if not SLUG.match(slug):
        v.add("channel.slug", "must match [a-z0-9][a-z0-9-]{0,62}")
    _validate(v, name, currency, timezone)
    v.raise_if_any("the channel is invalid")
    row = (
        await session.execute(
            insert(ChannelRow)
            .values(slug=slug, name=name.strip(), currency=currency, timezone=timezone, active=active)
            .on_conflict_do_nothing(index_elements=["slug"])
            .returning(ChannelRow)
        )
    ).scalar_one_or_none()
    if row is None:
        raise AlreadyExists("CHANNEL_EXISTS", f"channel {slug!r} already exists", metadata={"slug": slug})
    channel = _to_channel(row)
    await emit(session, Event("channel.created", "channel", slug, {"slug": slug}, channel=slug))
    return channel


async def get_channel(session: AsyncSession, slug: str) -> Channel:
    row = await session.get(ChannelRow, slug)
    if row is None:
        raise NotFound("CHANNEL_NOT_FOUND", f"channel {slug!r} does not exist", metadata={"slug": slug})
    return _to_channel(row)


async def list_channels(session: AsyncSession, *, size: int, token: str) -> tuple[list[Channel], str]:
    n = page_size(size)
    after = decode_token(token, "channels")
    stmt = select(ChannelRow).order_by(ChannelRow.slug).limit(n + 1)
    if after is not None:
        stmt = stmt.where(ChannelRow.slug > str(after))
    rows = list((await session.execute(stmt)).scalars())
    more = len(rows) > n
    rows = rows[:n]
    return [_to_channel(r) for r in rows], encode_token(rows[-1].slug, "channels") if more else ""


async def update_channel(
    session: AsyncSession,
    *,
    slug: str,
    fields: Collection[str],
    name: str,
    currency: str,
    timezone: str,
    active: bool,
) -> Channel:
    paths = set(fields) or set(UPDATABLE)
    v = Violations()
    for p in paths - set(UPDATABLE):
        v.add("update_mask", f"{p!r} cannot be updated (updatable: {', '.join(UPDATABLE)})")
    v.raise_if_any("the update is invalid")
    row = (
        await session.execute(select(ChannelRow).where(ChannelRow.slug == slug).with_for_update())
    ).scalar_one_or_none()
    if row is None:
        raise NotFound("CHANNEL_NOT_FOUND", f"channel {slug!r} does not exist", metadata={"slug": slug})
    new = {
        "name": name if "name" in paths else row.name,
        "currency": currency if "currency" in paths else row.currency,
        "timezone": timezone if "timezone" in paths else row.timezone,
    }
    _validate(v, new["name"], new["currency"], new["timezone"])
    v.raise_if_any("the channel is invalid")
    row.name, row.currency, row.timezone = new["name"].strip(), new["currency"], new["timezone"]
    if "active" in paths:
        row.active = active
    await session.flush()
    await session.refresh(row)
    await emit(
        session,
        Event("channel.updated", "channel", slug, {"slug": slug, "fields": sorted(paths)}, channel=slug),
    )
    return _to_channel(row)
