"""Forms (versioned), rules, document types, agreement templates and invitation codes."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from domain.registration.forms import FormDefinition, check_definition, parse_definition
from domain.registration.rules import Address, Evaluation, Rule, evaluate, parse_geo, parse_requirements
from domain.shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Violations
from domain.shared.outbox import Event, emit
from domain.shared.pagination import decode_token, encode_token, page_size

SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
CODE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
INVITATION = re.compile(r"^[A-Za-z0-9_-]{4,64}$")
DEFAULT_EXPIRE_AFTER = 30 * 24 * 3600
DEFAULT_CONTENT_TYPES = ("application/pdf", "image/png", "image/jpeg")
DEFAULT_MAX_SIZE = 10 * 1024 * 1024
MAX_SIZE = 50 * 1024 * 1024


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def js(value: Any) -> Any:
    """jsonb read through text(): asyncpg may hand back the JSON text."""
    return json.loads(value) if isinstance(value, str) else value


# ------------------------------------------------------------------ forms


@dataclass(frozen=True)
class Form:
    id: str
    slug: str
    channel: str
    version: int
    name: str
    description: str
    customer_group: str
    invitation_required: bool
    steps: list[dict[str, Any]]
    expire_after_seconds: int
    active: bool
    created_at: datetime
    updated_at: datetime

    def definition(self) -> FormDefinition:
        return parse_definition(self.steps)[0]


FORM_FIELDS = (
    "name",
    "description",
    "customer_group",
    "invitation_required",
    "steps",
    "expire_after",
    "active",
)

_FORM_SELECT = """
    SELECT f.id, f.slug, f.channel, v.version, v.name, v.description, v.customer_group, v.invitation_required,
           v.steps, v.expire_after_seconds, f.active, f.created_at, f.updated_at
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
    )


async def _check_form(
    session: AsyncSession,
    v: Violations,
    name: str,
    steps: Sequence[Mapping[str, Any]],
    expire_after_seconds: int,
) -> None:
    if not name.strip() or len(name) > 200:
        v.add("form.name", "must be 1 to 200 characters")
    if expire_after_seconds < 1:
        v.add("form.expire_after", "must be at least 1 second")
    definition, parse_v = parse_definition(steps)
    v.items.extend(parse_v.items)
    check_definition(definition, v)
    docs = {f.document_type_code for _, _, f in definition.fields() if f.document_type_code}
    agreements = {f.agreement_code for _, _, f in definition.fields() if f.agreement_code}
    await _check_codes_exist(session, v, docs, agreements, "form.steps")


async def _check_codes_exist(
    session: AsyncSession, v: Violations, docs: Collection[str], agreements: Collection[str], path: str
) -> None:
    if docs:
        known = set(
            (
                await session.execute(
                    text("SELECT code FROM registration.document_types WHERE code = ANY(:c)"),
                    {"c": list(docs)},
                )
            ).scalars()
        )
        for code in sorted(set(docs) - known):
            v.add(path, f"document type {code!r} does not exist")
    if agreements:
        known = set(
            (
                await session.execute(
                    text("SELECT DISTINCT code FROM registration.agreement_templates WHERE code = ANY(:c)"),
                    {"c": list(agreements)},
                )
            ).scalars()
        )
        for code in sorted(set(agreements) - known):
            v.add(path, f"agreement {code!r} does not exist")


async def create_form(
    session: AsyncSession,
    *,
    channel: str,
    slug: str,
    name: str,
    description: str,
    customer_group: str,
    invitation_required: bool,
    steps: Sequence[Mapping[str, Any]],
    expire_after_seconds: int | None,
    active: bool,
) -> Form:
    v = Violations()
    if not SLUG.match(slug):
        v.add("form.slug", "must match [a-z0-9][a-z0-9-]{0,62}")
    expire = expire_after_seconds or DEFAULT_EXPIRE_AFTER
    await _check_form(session, v, name, steps, expire)
    v.raise_if_any("the form is invalid")
    form_id = new_id("frm")
    inserted = (
        await session.execute(
            text(
                "INSERT INTO registration.forms (id, channel, slug, active) VALUES (:id, :ch, :slug, :active) "
                "ON CONFLICT (channel, slug) DO NOTHING RETURNING id"
            ),
            {"id": form_id, "ch": channel, "slug": slug, "active": active},
        )
    ).scalar_one_or_none()
    if inserted is None:
        raise AlreadyExists(
            "FORM_EXISTS", f"form {slug!r} already exists in this channel", metadata={"slug": slug}
        )
    await _insert_version(
        session, form_id, 1, name, description, customer_group, invitation_required, steps, expire
    )
    await emit(
        session, Event("registration.form.created", "registration_form", form_id, {"slug": slug}, channel)
    )
    return await get_form(session, channel=channel, form_id=form_id)


async def _insert_version(
    session: AsyncSession,
    form_id: str,
    version: int,
    name: str,
    description: str,
    customer_group: str,
    invitation_required: bool,
    steps: Sequence[Mapping[str, Any]],
    expire: int,
) -> None:
    await session.execute(
        text(
            "INSERT INTO registration.form_versions (form_id, version, name, description, customer_group, "
            "invitation_required, expire_after_seconds, steps) "
            "VALUES (:id, :v, :name, :d, :g, :inv, :exp, CAST(:steps AS jsonb))"
        ),
        {
            "id": form_id,
            "v": version,
            "name": name.strip(),
            "d": description,
            "g": customer_group,
            "inv": invitation_required,
            "exp": expire,
            "steps": json.dumps(list(steps)),
        },
    )


async def update_form(
    session: AsyncSession,
    *,
    channel: str,
    form_id: str,
    fields: Collection[str],
    name: str,
    description: str,
    customer_group: str,
    invitation_required: bool,
    steps: Sequence[Mapping[str, Any]],
    expire_after_seconds: int | None,
    active: bool,
) -> Form:
    paths = set(fields) or set(FORM_FIELDS)
    v = Violations()
    for p in sorted(paths - set(FORM_FIELDS)):
        v.add("update_mask", f"{p!r} cannot be updated (updatable: {', '.join(FORM_FIELDS)})")
    v.raise_if_any("the update is invalid")
    locked = (
        await session.execute(
            text("SELECT version FROM registration.forms WHERE id = :id AND channel = :ch FOR UPDATE"),
            {"id": form_id, "ch": channel},
        )
    ).scalar_one_or_none()
    if locked is None:
        raise NotFound("FORM_NOT_FOUND", f"form {form_id!r} does not exist", metadata={"form_id": form_id})
    cur = await get_form(session, channel=channel, form_id=form_id)
    new_name = name if "name" in paths else cur.name
    new_steps = list(steps) if "steps" in paths else cur.steps
    expire = (
        (expire_after_seconds or DEFAULT_EXPIRE_AFTER)
        if "expire_after" in paths
        else cur.expire_after_seconds
    )
    await _check_form(session, v, new_name, new_steps, expire)
    v.raise_if_any("the form is invalid")
    version = cur.version + 1
    await _insert_version(
        session,
        form_id,
        version,
        new_name,
        description if "description" in paths else cur.description,
        customer_group if "customer_group" in paths else cur.customer_group,
        invitation_required if "invitation_required" in paths else cur.invitation_required,
        new_steps,
        expire,
    )
    await session.execute(
        text("UPDATE registration.forms SET version = :v, active = :a, updated_at = now() WHERE id = :id"),
        {"v": version, "a": active if "active" in paths else cur.active, "id": form_id},
    )
    await emit(
        session,
        Event("registration.form.updated", "registration_form", form_id, {"version": version}, channel),
    )
    return await get_form(session, channel=channel, form_id=form_id)


async def get_form(
    session: AsyncSession, *, channel: str, form_id: str = "", slug: str = "", version: int = 0
) -> Form:
    if not form_id and not slug:
        raise InvalidArgument("FORM_REQUIRED", "give the form's id or slug", metadata={})
    key = "f.id = :key" if form_id else "f.slug = :key"
    ver = "v.version = :ver" if version > 0 else "v.version = f.version"
    row = (
        await session.execute(
            text(f"{_FORM_SELECT} WHERE f.channel = :ch AND {key} AND {ver}"),
            {"ch": channel, "key": form_id or slug, "ver": version},
        )
    ).one_or_none()
    if row is None:
        ref = form_id or slug
        raise NotFound("FORM_NOT_FOUND", f"form {ref!r} (version {version or 'current'}) does not exist here")
    return _form(row)


async def resolve_form(session: AsyncSession, *, channel: str, ref: str) -> Form:
    """A submission names the form by id or slug."""
    if ref.startswith("frm_"):
        return await get_form(session, channel=channel, form_id=ref)
    return await get_form(session, channel=channel, slug=ref)


async def list_forms(session: AsyncSession, *, channel: str, size: int, token: str) -> tuple[list[Form], str]:
    n = page_size(size)
    after = decode_token(token, ["forms", channel])
    rows = (
        await session.execute(
            text(
                f"{_FORM_SELECT} WHERE f.channel = :ch AND v.version = f.version AND f.slug > :after ORDER BY f.slug LIMIT :n"
            ),
            {"ch": channel, "after": str(after or ""), "n": n + 1},
        )
    ).all()
    forms = [_form(r) for r in rows[:n]]
    return forms, encode_token(forms[-1].slug, ["forms", channel]) if len(rows) > n else ""


# ------------------------------------------------------------------ rules


@dataclass(frozen=True)
class RuleRecord:
    rule: Rule
    channel: str
    geo: dict[str, Any]
    requirements: dict[str, Any]
    created_at: datetime


RULE_TYPES = ("require", "block", "exempt")


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


_RULE_SELECT = (
    "SELECT id, channel, name, type, geo, requirements, reason, priority, form_id, active, created_at "
    "FROM registration.rules"
)


async def create_rule(
    session: AsyncSession,
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
    v = Violations()
    if not name.strip() or len(name) > 200:
        v.add("rule.name", "must be 1 to 200 characters")
    if type not in RULE_TYPES:
        v.add("rule.type", "must be REQUIRE, BLOCK or EXEMPT")
    parsed_geo = parse_geo(geo, "rule.geo", v)
    parsed_reqs = parse_requirements(requirements, "rule.requirements", v)
    if type == "require" and parsed_reqs.is_empty():
        v.add("rule.requirements", "a REQUIRE rule needs at least one requirement")
    if type != "require" and not parsed_reqs.is_empty():
        v.add("rule.requirements", "only REQUIRE rules carry requirements")
    if type == "block" and not reason.strip():
        v.add("rule.reason", "a BLOCK rule needs a reason the applicant can read")
    del parsed_geo
    leaves = list(parsed_reqs.leaves())
    await _check_codes_exist(
        session,
        v,
        {r.code for r in leaves if r.kind == "document"},
        {r.code for r in leaves if r.kind == "agreement"},
        "rule.requirements",
    )
    if form_id:
        exists = (
            await session.execute(
                text("SELECT 1 FROM registration.forms WHERE id = :id AND channel = :ch"),
                {"id": form_id, "ch": channel},
            )
        ).scalar_one_or_none()
        if exists is None:
            v.add("rule.form_id", f"form {form_id!r} does not exist in this channel")
    v.raise_if_any("the rule is invalid")
    rule_id = new_id("rul")
    row = (
        await session.execute(
            text(
                "INSERT INTO registration.rules (id, channel, name, type, geo, requirements, reason, priority, "
                "form_id, active) VALUES (:id, :ch, :name, :type, CAST(:geo AS jsonb), CAST(:req AS jsonb), "
                ":reason, :prio, :form, :active) "
                "RETURNING id, channel, name, type, geo, requirements, reason, priority, form_id, active, created_at"
            ),
            {
                "id": rule_id,
                "ch": channel,
                "name": name.strip(),
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
    await emit(
        session, Event("registration.rule.created", "registration_rule", rule_id, {"type": type}, channel)
    )
    return _rule_record(row)


async def list_rules(
    session: AsyncSession, *, channel: str, form_id: str, size: int, token: str
) -> tuple[list[RuleRecord], str]:
    n = page_size(size)
    filters = ["rules", channel, form_id]
    after = decode_token(token, filters)
    where = "channel = :ch AND (CAST(:form AS text) = '' OR form_id IS NULL OR form_id = :form)"
    params: dict[str, Any] = {"ch": channel, "form": form_id, "n": n + 1}
    if after is not None:
        where += " AND (created_at, id) > (CAST(:at AS timestamptz), :id)"
        params |= {"at": datetime.fromisoformat(after[0]), "id": after[1]}
    rows = (
        await session.execute(text(f"{_RULE_SELECT} WHERE {where} ORDER BY created_at, id LIMIT :n"), params)
    ).all()
    recs = [_rule_record(r) for r in rows[:n]]
    token_out = (
        encode_token([recs[-1].created_at.isoformat(), recs[-1].rule.id], filters) if len(rows) > n else ""
    )
    return recs, token_out


async def channel_rules(session: AsyncSession, channel: str) -> list[Rule]:
    rows = (
        await session.execute(text(f"{_RULE_SELECT} WHERE channel = :ch AND active"), {"ch": channel})
    ).all()
    return [_rule_record(r).rule for r in rows]


async def evaluate_rules(
    session: AsyncSession, *, channel: str, address: Address, form_id: str
) -> Evaluation:
    return evaluate(await channel_rules(session, channel), address, form_id)


# ------------------------------------------------------------------ document types


@dataclass(frozen=True)
class DocumentType:
    code: str
    name: str
    description: str
    allowed_content_types: tuple[str, ...]
    max_size_bytes: int
    requires_expiration_date: bool
    requires_number: bool
    requires_issuing_authority: bool
    active: bool
    created_at: datetime
    updated_at: datetime


DOCUMENT_TYPE_FIELDS = (
    "name",
    "description",
    "allowed_content_types",
    "max_size_bytes",
    "requires_expiration_date",
    "requires_number",
    "requires_issuing_authority",
    "active",
)
_DT_COLUMNS = "code, " + ", ".join(DOCUMENT_TYPE_FIELDS) + ", created_at, updated_at"
MIME = re.compile(r"^[a-z]+/[a-z0-9.+-]+$")


def _doc_type(row: Any) -> DocumentType:
    return DocumentType(row[0], row[1], row[2], tuple(row[3]), int(row[4]), *row[5:])


def _check_doc_type(v: Violations, values: Mapping[str, Any]) -> None:
    if not str(values["name"]).strip():
        v.add("document_type.name", "is required")
    for i, ct in enumerate(values["allowed_content_types"]):
        if not MIME.match(ct):
            v.add(f"document_type.allowed_content_types[{i}]", f"{ct!r} is not a MIME type")
    if not 1 <= int(values["max_size_bytes"]) <= MAX_SIZE:
        v.add("document_type.max_size_bytes", f"must be 1 to {MAX_SIZE}")


async def create_document_type(
    session: AsyncSession, *, code: str, values: Mapping[str, Any]
) -> DocumentType:
    vals = dict(values)
    vals["allowed_content_types"] = list(vals.get("allowed_content_types") or DEFAULT_CONTENT_TYPES)
    vals["max_size_bytes"] = int(vals.get("max_size_bytes") or DEFAULT_MAX_SIZE)
    v = Violations()
    if not CODE.match(code):
        v.add("document_type.code", "must match [a-z0-9][a-z0-9_-]{0,62}")
    _check_doc_type(v, vals)
    v.raise_if_any("the document type is invalid")
    cols = ", ".join(DOCUMENT_TYPE_FIELDS)
    binds = ", ".join(":" + f for f in DOCUMENT_TYPE_FIELDS)
    row = (
        await session.execute(
            text(
                f"INSERT INTO registration.document_types (code, {cols}) VALUES (:code, {binds}) "
                f"ON CONFLICT (code) DO NOTHING RETURNING {_DT_COLUMNS}"
            ),
            {"code": code, **{f: vals[f] for f in DOCUMENT_TYPE_FIELDS}},
        )
    ).one_or_none()
    if row is None:
        raise AlreadyExists(
            "DOCUMENT_TYPE_EXISTS", f"document type {code!r} already exists", metadata={"code": code}
        )
    await emit(session, Event("registration.document_type.created", "document_type", code, {"code": code}))
    return _doc_type(row)


async def get_document_type(session: AsyncSession, code: str, *, for_update: bool = False) -> DocumentType:
    lock = " FOR UPDATE" if for_update else ""
    row = (
        await session.execute(
            text(f"SELECT {_DT_COLUMNS} FROM registration.document_types WHERE code = :c{lock}"), {"c": code}
        )
    ).one_or_none()
    if row is None:
        raise NotFound(
            "DOCUMENT_TYPE_NOT_FOUND", f"document type {code!r} does not exist", metadata={"code": code}
        )
    return _doc_type(row)


async def list_document_types(
    session: AsyncSession, *, size: int, token: str
) -> tuple[list[DocumentType], str]:
    n = page_size(size)
    after = decode_token(token, "document_types")
    rows = (
        await session.execute(
            text(
                f"SELECT {_DT_COLUMNS} FROM registration.document_types WHERE code > :a ORDER BY code LIMIT :n"
            ),
            {"a": str(after or ""), "n": n + 1},
        )
    ).all()
    items = [_doc_type(r) for r in rows[:n]]
    return items, encode_token(items[-1].code, "document_types") if len(rows) > n else ""


async def update_document_type(
    session: AsyncSession, *, code: str, fields: Collection[str], values: Mapping[str, Any]
) -> DocumentType:
    paths = set(fields) or set(DOCUMENT_TYPE_FIELDS)
    v = Violations()
    for p in sorted(paths - set(DOCUMENT_TYPE_FIELDS)):
        v.add("update_mask", f"{p!r} cannot be updated")
    v.raise_if_any("the update is invalid")
    cur = await get_document_type(session, code, for_update=True)
    merged = {f: (values[f] if f in paths else getattr(cur, f)) for f in DOCUMENT_TYPE_FIELDS}
    merged["allowed_content_types"] = list(merged["allowed_content_types"] or DEFAULT_CONTENT_TYPES)
    merged["max_size_bytes"] = int(merged["max_size_bytes"] or DEFAULT_MAX_SIZE)
    _check_doc_type(v, merged)
    v.raise_if_any("the document type is invalid")
    sets = ", ".join(f"{f} = :{f}" for f in DOCUMENT_TYPE_FIELDS)
    row = (
        await session.execute(
            text(
                f"UPDATE registration.document_types SET {sets}, updated_at = now() WHERE code = :code "
                f"RETURNING {_DT_COLUMNS}"
            ),
            {"code": code, **merged},
        )
    ).one()
    await emit(
        session, Event("registration.document_type.updated", "document_type", code, {"fields": sorted(paths)})
    )
    return _doc_type(row)


async def delete_document_type(session: AsyncSession, code: str) -> None:
    await get_document_type(session, code, for_update=True)
    used = (
        await session.execute(
            text("SELECT 1 FROM registration.documents WHERE document_type_code = :c LIMIT 1"), {"c": code}
        )
    ).scalar_one_or_none()
    if used is not None:
        raise FailedPrecondition(
            "DOCUMENT_TYPE_IN_USE",
            f"documents of type {code!r} exist; deactivate it instead",
            metadata={"code": code},
        )
    await session.execute(text("DELETE FROM registration.document_types WHERE code = :c"), {"c": code})
    await emit(session, Event("registration.document_type.deleted", "document_type", code, {"code": code}))


# ------------------------------------------------------------------ agreements


@dataclass(frozen=True)
class AgreementTemplate:
    code: str
    version: int
    title: str
    body: str
    body_sha256: str
    signature_required: bool
    created_at: datetime


_AG_COLUMNS = "code, version, title, body, body_sha256, signature_required, created_at"


async def publish_agreement(
    session: AsyncSession, *, code: str, title: str, body: str, signature_required: bool, create: bool
) -> AgreementTemplate:
    """create=True: version 1 (ALREADY_EXISTS if any); False: the next version (NOT_FOUND if none)."""
    v = Violations()
    if not CODE.match(code):
        v.add("agreement.code", "must match [a-z0-9][a-z0-9_-]{0,62}")
    if not title.strip():
        v.add("agreement.title", "is required")
    if not body.strip():
        v.add("agreement.body", "is required")
    v.raise_if_any("the agreement is invalid")
    # Serialize publishers of one code so versions are dense.
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtext('registration.agreement:' || :c))"), {"c": code}
    )
    latest = (
        await session.execute(
            text("SELECT max(version) FROM registration.agreement_templates WHERE code = :c"), {"c": code}
        )
    ).scalar_one_or_none()
    if create and latest is not None:
        raise AlreadyExists("AGREEMENT_EXISTS", f"agreement {code!r} already exists", metadata={"code": code})
    if not create and latest is None:
        raise NotFound("AGREEMENT_NOT_FOUND", f"agreement {code!r} does not exist", metadata={"code": code})
    version = (latest or 0) + 1
    row = (
        await session.execute(
            text(
                "INSERT INTO registration.agreement_templates (code, version, title, body, body_sha256, "
                f"signature_required) VALUES (:c, :v, :t, :b, :h, :s) RETURNING {_AG_COLUMNS}"
            ),
            {
                "c": code,
                "v": version,
                "t": title.strip(),
                "b": body,
                "h": hashlib.sha256(body.encode()).hexdigest(),
                "s": signature_required,
            },
        )
    ).one()
    await emit(session, Event("registration.agreement.published", "agreement", code, {"version": version}))
    return AgreementTemplate(*row)


async def get_agreement(session: AsyncSession, code: str, version: int = 0) -> AgreementTemplate:
    cond = "version = :v" if version > 0 else "TRUE ORDER BY version DESC LIMIT 1"
    row = (
        await session.execute(
            text(f"SELECT {_AG_COLUMNS} FROM registration.agreement_templates WHERE code = :c AND {cond}"),
            {"c": code, "v": version},
        )
    ).one_or_none()
    if row is None:
        raise NotFound(
            "AGREEMENT_NOT_FOUND", f"agreement {code!r} (version {version or 'latest'}) does not exist"
        )
    return AgreementTemplate(*row)


async def list_agreements(
    session: AsyncSession, *, size: int, token: str
) -> tuple[list[AgreementTemplate], str]:
    n = page_size(size)
    after = decode_token(token, "agreements")
    rows = (
        await session.execute(
            text(
                f"SELECT DISTINCT ON (code) {_AG_COLUMNS} FROM registration.agreement_templates "
                "WHERE code > :a ORDER BY code, version DESC LIMIT :n"
            ),
            {"a": str(after or ""), "n": n + 1},
        )
    ).all()
    items = [AgreementTemplate(*r) for r in rows[:n]]
    return items, encode_token(items[-1].code, "agreements") if len(rows) > n else ""


# ------------------------------------------------------------------ invitation codes


@dataclass(frozen=True)
class InvitationCode:
    code: str
    channel: str
    form_id: str
    customer_group: str
    max_uses: int
    uses: int
    expires_at: datetime | None
    active: bool
    created_at: datetime


_IC_COLUMNS = (
    "code, channel, coalesce(form_id, ''), customer_group, max_uses, uses, expires_at, active, created_at"
)


async def create_invitation_code(
    session: AsyncSession,
    *,
    channel: str,
    code: str,
    form_id: str,
    customer_group: str,
    max_uses: int,
    expires_at: datetime | None,
    active: bool,
) -> InvitationCode:
    v = Violations()
    if not INVITATION.match(code):
        v.add("invitation_code.code", "must be 4 to 64 of [A-Za-z0-9_-]")
    if max_uses < 1:
        v.add("invitation_code.max_uses", "must be at least 1")
    if form_id:
        found = (
            await session.execute(
                text("SELECT 1 FROM registration.forms WHERE id = :id AND channel = :ch"),
                {"id": form_id, "ch": channel},
            )
        ).scalar_one_or_none()
        if found is None:
            v.add("invitation_code.form_id", f"form {form_id!r} does not exist in this channel")
    v.raise_if_any("the invitation code is invalid")
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
    if row is None:
        raise AlreadyExists(
            "INVITATION_CODE_EXISTS", f"invitation code {code!r} already exists", metadata={"code": code}
        )
    await emit(session, Event("registration.invitation_code.created", "invitation_code", code, {}, channel))
    return InvitationCode(*row)


async def get_invitation_code(session: AsyncSession, *, channel: str, code: str) -> InvitationCode:
    row = (
        await session.execute(
            text(
                f"SELECT {_IC_COLUMNS} FROM registration.invitation_codes WHERE channel = :ch AND code = :c"
            ),
            {"ch": channel, "c": code},
        )
    ).one_or_none()
    if row is None:
        raise NotFound(
            "INVITATION_CODE_NOT_FOUND", f"invitation code {code!r} does not exist", metadata={"code": code}
        )
    return InvitationCode(*row)


async def list_invitation_codes(
    session: AsyncSession, *, channel: str, size: int, token: str
) -> tuple[list[InvitationCode], str]:
    n = page_size(size)
    filters = ["invitation_codes", channel]
    after = decode_token(token, filters)
    rows = (
        await session.execute(
            text(
                f"SELECT {_IC_COLUMNS} FROM registration.invitation_codes WHERE channel = :ch AND code > :a "
                "ORDER BY code LIMIT :n"
            ),
            {"ch": channel, "a": str(after or ""), "n": n + 1},
        )
    ).all()
    items = [InvitationCode(*r) for r in rows[:n]]
    return items, encode_token(items[-1].code, filters) if len(rows) > n else ""


async def redeem_invitation_code(
    session: AsyncSession, *, channel: str, code: str, form_id: str
) -> InvitationCode:
    """Take one use of the code, atomically.

    One conditional UPDATE decides: the row lock serializes concurrent
    redeemers and each re-checks `uses < max_uses` on the latest row, so a
    code with N uses is redeemed at most N times however many race (no
    read-then-write in Python). When it matches nothing, a plain read
    explains why.
    """
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
    if row is not None:
        return InvitationCode(*row)
    ic = await get_invitation_code(session, channel=channel, code=code)
    meta = {"code": code}
    if not ic.active:
        raise FailedPrecondition(
            "INVITATION_CODE_INACTIVE", "the invitation code is not active", metadata=meta
        )
    if ic.form_id and ic.form_id != form_id:
        raise FailedPrecondition(
            "INVITATION_CODE_WRONG_FORM", "the invitation code is for another form", metadata=meta
        )
    if ic.uses >= ic.max_uses:
        raise FailedPrecondition(
            "INVITATION_CODE_EXHAUSTED", "the invitation code has been used up", metadata=meta
        )
    raise FailedPrecondition("INVITATION_CODE_EXPIRED", "the invitation code has expired", metadata=meta)
