"""Forms (versioned), rules, document types, agreement templates and
invitation codes: their statements."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from domain.registration.rules import Rule, parse_geo, parse_requirements
from domain.registration.store.rows import js
from domain.registration.types import (
    DOCUMENT_TYPE_FIELDS,
    AgreementTemplate,
    DocumentType,
    Form,
    InvitationCode,
    RuleRecord,
)
from domain.shared.errors import Violations

# ------------------------------------------------------------------ forms

_FORM_SELECT = """
    SELECT f.id, f.slug, f.channel, v.version, v.name, v.description, v.customer_group, v.invitation_required,
           v.steps, v.expire_after_seconds, f.active, f.created_at, f.updated_at, v.commerce_mode
    FROM registration.forms f JOIN registration.form_versions v ON v.form_id = f.id
"""


def _form(row: Any) -> Form:
    return Form(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        row[5],
        row[6],
        row[7],
        js(row[8]),
        int(row[9]),
        row[10],
        row[11],
        row[12],
        row[13],
    )


async def insert_form(session: AsyncSession, form_id: str, *, channel: str, slug: str, active: bool) -> bool:
    """False when the channel already has a form with this slug."""
    inserted = (
        await session.execute(
            text(
                "INSERT INTO registration.forms (id, channel, slug, active) VALUES (:id, :ch, :slug, :active) "
                "ON CONFLICT (channel, slug) DO NOTHING RETURNING id"
            ),
            {"id": form_id, "ch": channel, "slug": slug, "active": active},
        )
    ).scalar_one_or_none()
    return inserted is not None


async def insert_form_version(
    session: AsyncSession,
    form_id: str,
    version: int,
    *,
    name: str,
    description: str,
    customer_group: str,
    invitation_required: bool,
    steps: Sequence[Mapping[str, Any]],
    expire_after_seconds: int,
    commerce_mode: str,
) -> None:
    await session.execute(
        text(
            "INSERT INTO registration.form_versions (form_id, version, name, description, customer_group, "
            "invitation_required, expire_after_seconds, steps, commerce_mode) "
            "VALUES (:id, :v, :name, :d, :g, :inv, :exp, CAST(:steps AS jsonb), :mode)"
        ),
        {
            "id": form_id,
            "v": version,
            "name": name,
            "d": description,
            "g": customer_group,
            "inv": invitation_required,
            "exp": expire_after_seconds,
            "steps": json.dumps(list(steps)),
            "mode": commerce_mode,
        },
    )


async def lock_form(session: AsyncSession, form_id: str, channel: str) -> bool:
    """Locks the form's row for a new version; False when the channel has no such form."""
    version = (
        await session.execute(
            text("SELECT version FROM registration.forms WHERE id = :id AND channel = :ch FOR UPDATE"),
            {"id": form_id, "ch": channel},
        )
    ).scalar_one_or_none()
    return version is not None


async def set_current_version(session: AsyncSession, form_id: str, version: int, *, active: bool) -> None:
    await session.execute(
        text("UPDATE registration.forms SET version = :v, active = :a, updated_at = now() WHERE id = :id"),
        {"v": version, "a": active, "id": form_id},
    )


async def find_form(
    session: AsyncSession, *, channel: str, form_id: str = "", slug: str = "", version: int = 0
) -> Form | None:
    """By id, else by slug; `version` 0 is the current version."""
    key = "f.id = :key" if form_id else "f.slug = :key"
    ver = "v.version = :ver" if version > 0 else "v.version = f.version"
    row = (
        await session.execute(
            text(f"{_FORM_SELECT} WHERE f.channel = :ch AND {key} AND {ver}"),
            {"ch": channel, "key": form_id or slug, "ver": version},
        )
    ).one_or_none()
    return None if row is None else _form(row)


async def forms_after(
    session: AsyncSession, *, channel: str, slug: str, limit: int, modes: Collection[str] = ()
) -> tuple[list[Form], bool]:
    """Up to `limit` current forms by slug after `slug` (of a commerce mode in
    `modes` only, when given); and whether more follow."""
    only_modes = "AND v.commerce_mode = ANY(CAST(:modes AS text[])) " if modes else ""
    rows = (
        await session.execute(
            text(
                f"{_FORM_SELECT} WHERE f.channel = :ch AND v.version = f.version AND f.slug > :after "
                f"{only_modes}ORDER BY f.slug LIMIT :n"
            ),
            {"ch": channel, "after": slug, "n": limit + 1, "modes": sorted(modes)},
        )
    ).all()
    return [_form(r) for r in rows[:limit]], len(rows) > limit


async def form_exists(session: AsyncSession, form_id: str, channel: str) -> bool:
    found = (
        await session.execute(
            text("SELECT 1 FROM registration.forms WHERE id = :id AND channel = :ch"),
            {"id": form_id, "ch": channel},
        )
    ).scalar_one_or_none()
    return found is not None


async def unknown_codes(
    session: AsyncSession, *, documents: Collection[str], agreements: Collection[str]
) -> tuple[list[str], list[str]]:
    """The document type codes and agreement codes (each sorted) that do not exist."""
    missing_docs: list[str] = []
    missing_agreements: list[str] = []
    if documents:
        known = set(
            (
                await session.execute(
                    text("SELECT code FROM registration.document_types WHERE code = ANY(:c)"),
                    {"c": list(documents)},
                )
            ).scalars()
        )
        missing_docs = sorted(set(documents) - known)
    if agreements:
        known = set(
            (
                await session.execute(
                    text("SELECT DISTINCT code FROM registration.agreement_templates WHERE code = ANY(:c)"),
                    {"c": list(agreements)},
                )
            ).scalars()
        )
        missing_agreements = sorted(set(agreements) - known)
    return missing_docs, missing_agreements


# ------------------------------------------------------------------ rules

_RULE_COLUMNS = "id, channel, name, type, geo, requirements, reason, priority, form_id, active, created_at"


def _rule_record(row: Any) -> RuleRecord:
    v = Violations()
    geo, reqs = js(row.geo), js(row.requirements)
    rule = Rule(
        id=row.id,
        name=row.name,
        type=row.type,
        geo=parse_geo(geo, "geo", v),
        requirements=parse_requirements(reqs, "requirements", v),
        reason=row.reason,
        priority=row.priority,
        form_id=row.form_id or "",
        active=row.active,
    )
    return RuleRecord(rule, row.channel, geo, reqs, row.created_at)


async def insert_rule(
    session: AsyncSession,
    rule_id: str,
    *,
    channel: str,
    name: str,
    type: str,
    geo: Mapping[str, Any],
    requirements: Mapping[str, Any],
    reason: str,
    priority: int,
    form_id: str,
    active: bool,
) -> RuleRecord:
    row = (
        await session.execute(
            text(
                "INSERT INTO registration.rules (id, channel, name, type, geo, requirements, reason, priority, "
                "form_id, active) VALUES (:id, :ch, :name, :type, CAST(:geo AS jsonb), CAST(:req AS jsonb), "
                f":reason, :prio, :form, :active) RETURNING {_RULE_COLUMNS}"
            ),
            {
                "id": rule_id,
                "ch": channel,
                "name": name,
                "type": type,
                "geo": json.dumps(dict(geo)),
                "req": json.dumps(dict(requirements)),
                "reason": reason,
                "prio": priority,
                "form": form_id or None,
                "active": active,
            },
        )
    ).one()
    return _rule_record(row)


async def rules_after(
    session: AsyncSession, *, channel: str, form_id: str, after: tuple[datetime, str] | None, limit: int
) -> tuple[list[RuleRecord], bool]:
    """Up to `limit` rules of the channel (and of `form_id` or of every form) in
    creation order after `after` (created_at, id); and whether more follow."""
    where = "channel = :ch AND (CAST(:form AS text) = '' OR form_id IS NULL OR form_id = :form)"
    params: dict[str, Any] = {"ch": channel, "form": form_id, "n": limit + 1}
    if after is not None:
        where += " AND (created_at, id) > (CAST(:at AS timestamptz), :id)"
        params |= {"at": after[0], "id": after[1]}
    rows = (
        await session.execute(
            text(
                f"SELECT {_RULE_COLUMNS} FROM registration.rules WHERE {where} ORDER BY created_at, id LIMIT :n"
            ),
            params,
        )
    ).all()
    return [_rule_record(r) for r in rows[:limit]], len(rows) > limit


async def active_rules(session: AsyncSession, channel: str) -> list[Rule]:
    rows = (
        await session.execute(
            text(f"SELECT {_RULE_COLUMNS} FROM registration.rules WHERE channel = :ch AND active"),
            {"ch": channel},
        )
    ).all()
    return [_rule_record(r).rule for r in rows]


# ------------------------------------------------------------------ document types

_DT_COLUMNS = "code, " + ", ".join(DOCUMENT_TYPE_FIELDS) + ", created_at, updated_at"


def _doc_type(row: Any) -> DocumentType:
    return DocumentType(row[0], row[1], row[2], tuple(row[3]), int(row[4]), *row[5:])


async def insert_document_type(
    session: AsyncSession, code: str, values: Mapping[str, Any]
) -> DocumentType | None:
    """None when the code exists. `values` has every DOCUMENT_TYPE_FIELDS entry."""
    cols = ", ".join(DOCUMENT_TYPE_FIELDS)
    binds = ", ".join(":" + f for f in DOCUMENT_TYPE_FIELDS)
    row = (
        await session.execute(
            text(
                f"INSERT INTO registration.document_types (code, {cols}) VALUES (:code, {binds}) "
                f"ON CONFLICT (code) DO NOTHING RETURNING {_DT_COLUMNS}"
            ),
            {"code": code, **{f: values[f] for f in DOCUMENT_TYPE_FIELDS}},
        )
    ).one_or_none()
    return None if row is None else _doc_type(row)


async def find_document_type(
    session: AsyncSession, code: str, *, for_update: bool = False
) -> DocumentType | None:
    lock = " FOR UPDATE" if for_update else ""
    row = (
        await session.execute(
            text(f"SELECT {_DT_COLUMNS} FROM registration.document_types WHERE code = :c{lock}"), {"c": code}
        )
    ).one_or_none()
    return None if row is None else _doc_type(row)


async def document_types_after(
    session: AsyncSession, *, code: str, limit: int
) -> tuple[list[DocumentType], bool]:
    """Up to `limit` document types by code after `code`; and whether more follow."""
    rows = (
        await session.execute(
            text(
                f"SELECT {_DT_COLUMNS} FROM registration.document_types WHERE code > :a ORDER BY code LIMIT :n"
            ),
            {"a": code, "n": limit + 1},
        )
    ).all()
    return [_doc_type(r) for r in rows[:limit]], len(rows) > limit


async def update_document_type(session: AsyncSession, code: str, values: Mapping[str, Any]) -> DocumentType:
    """Writes every DOCUMENT_TYPE_FIELDS entry of `values`."""
    sets = ", ".join(f"{f} = :{f}" for f in DOCUMENT_TYPE_FIELDS)
    row = (
        await session.execute(
            text(
                f"UPDATE registration.document_types SET {sets}, updated_at = now() WHERE code = :code "
                f"RETURNING {_DT_COLUMNS}"
            ),
            {"code": code, **{f: values[f] for f in DOCUMENT_TYPE_FIELDS}},
        )
    ).one()
    return _doc_type(row)


async def document_type_in_use(session: AsyncSession, code: str) -> bool:
    used = (
        await session.execute(
            text("SELECT 1 FROM registration.documents WHERE document_type_code = :c LIMIT 1"), {"c": code}
        )
    ).scalar_one_or_none()
    return used is not None


async def delete_document_type(session: AsyncSession, code: str) -> None:
    await session.execute(text("DELETE FROM registration.document_types WHERE code = :c"), {"c": code})


# ------------------------------------------------------------------ agreements

_AG_COLUMNS = "code, version, title, body, body_sha256, signature_required, created_at"


async def lock_agreement_code(session: AsyncSession, code: str) -> None:
    """Serializes publishers of one code (until the transaction ends), so versions are dense."""
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtext('registration.agreement:' || :c))"), {"c": code}
    )


async def latest_agreement_version(session: AsyncSession, code: str) -> int | None:
    latest = (
        await session.execute(
            text("SELECT max(version) FROM registration.agreement_templates WHERE code = :c"), {"c": code}
        )
    ).scalar_one_or_none()
    return None if latest is None else int(latest)


async def insert_agreement(
    session: AsyncSession,
    *,
    code: str,
    version: int,
    title: str,
    body: str,
    body_sha256: str,
    signature_required: bool,
) -> AgreementTemplate:
    row = (
        await session.execute(
            text(
                "INSERT INTO registration.agreement_templates (code, version, title, body, body_sha256, "
                f"signature_required) VALUES (:c, :v, :t, :b, :h, :s) RETURNING {_AG_COLUMNS}"
            ),
            {"c": code, "v": version, "t": title, "b": body, "h": body_sha256, "s": signature_required},
        )
    ).one()
    return AgreementTemplate(*row)


async def find_agreement(session: AsyncSession, code: str, version: int = 0) -> AgreementTemplate | None:
    """The given version, or the latest when `version` is 0."""
    cond = "version = :v" if version > 0 else "TRUE ORDER BY version DESC LIMIT 1"
    row = (
        await session.execute(
            text(f"SELECT {_AG_COLUMNS} FROM registration.agreement_templates WHERE code = :c AND {cond}"),
            {"c": code, "v": version},
        )
    ).one_or_none()
    return None if row is None else AgreementTemplate(*row)


async def agreements_after(
    session: AsyncSession, *, code: str, limit: int
) -> tuple[list[AgreementTemplate], bool]:
    """Up to `limit` agreements (latest version each) by code after `code`; and whether more follow."""
    rows = (
        await session.execute(
            text(
                f"SELECT DISTINCT ON (code) {_AG_COLUMNS} FROM registration.agreement_templates "
                "WHERE code > :a ORDER BY code, version DESC LIMIT :n"
            ),
            {"a": code, "n": limit + 1},
        )
    ).all()
    return [AgreementTemplate(*r) for r in rows[:limit]], len(rows) > limit


# ------------------------------------------------------------------ invitation codes

_IC_COLUMNS = (
    "code, channel, coalesce(form_id, ''), customer_group, max_uses, uses, expires_at, active, created_at"
)


async def insert_invitation_code(
    session: AsyncSession,
    *,
    channel: str,
    code: str,
    form_id: str,
    customer_group: str,
    max_uses: int,
    expires_at: datetime | None,
    active: bool,
) -> InvitationCode | None:
    """None when the channel already has the code."""
    row = (
        await session.execute(
            text(
                "INSERT INTO registration.invitation_codes (channel, code, form_id, customer_group, max_uses, "
                "expires_at, active) VALUES (:ch, :code, :form, :g, :m, :exp, :a) "
                f"ON CONFLICT (channel, code) DO NOTHING RETURNING {_IC_COLUMNS}"
            ),
            {
                "ch": channel,
                "code": code,
                "form": form_id or None,
                "g": customer_group,
                "m": max_uses,
                "exp": expires_at,
                "a": active,
            },
        )
    ).one_or_none()
    return None if row is None else InvitationCode(*row)


async def find_invitation_code(session: AsyncSession, *, channel: str, code: str) -> InvitationCode | None:
    row = (
        await session.execute(
            text(
                f"SELECT {_IC_COLUMNS} FROM registration.invitation_codes WHERE channel = :ch AND code = :c"
            ),
            {"ch": channel, "c": code},
        )
    ).one_or_none()
    return None if row is None else InvitationCode(*row)


async def invitation_codes_after(
    session: AsyncSession, *, channel: str, code: str, limit: int
) -> tuple[list[InvitationCode], bool]:
    """Up to `limit` of the channel's codes after `code`; and whether more follow."""
    rows = (
        await session.execute(
            text(
                f"SELECT {_IC_COLUMNS} FROM registration.invitation_codes WHERE channel = :ch AND code > :a "
                "ORDER BY code LIMIT :n"
            ),
            {"ch": channel, "a": code, "n": limit + 1},
        )
    ).all()
    return [InvitationCode(*r) for r in rows[:limit]], len(rows) > limit


async def take_invitation_use(
    session: AsyncSession, *, channel: str, code: str, form_id: str
) -> InvitationCode | None:
    """One use of an active, unexpired code for this form, if one is left; else None.

    One conditional UPDATE decides: the row lock serializes concurrent
    redeemers and each re-checks `uses < max_uses` on the latest row, so a code
    with N uses is redeemed at most N times however many race."""
    row = (
        await session.execute(
            text(
                "UPDATE registration.invitation_codes SET uses = uses + 1 "
                "WHERE channel = :ch AND code = :c AND active AND uses < max_uses "
                "AND (expires_at IS NULL OR expires_at > now()) AND (form_id IS NULL OR form_id = :form) "
                f"RETURNING {_IC_COLUMNS}"
            ),
            {"ch": channel, "c": code, "form": form_id},
        )
    ).one_or_none()
    return None if row is None else InvitationCode(*row)


async def record_redemption(session: AsyncSession, *, channel: str, code: str, registration_id: str) -> None:
    await session.execute(
        text(
            "INSERT INTO registration.invitation_redemptions (channel, code, registration_id) "
            "VALUES (:ch, :c, :r)"
        ),
        {"ch": channel, "c": code, "r": registration_id},
    )
