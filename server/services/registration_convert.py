"""Proto <-> domain translation for the registration module, in one place.

Form steps, rule geo conditions and requirement groups travel to the domain
as their canonical JSON (proto field names), which is also how they are
stored; the domain parses and validates that JSON.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from domain.registration import catalog, submissions
from domain.registration.forms import Answer
from domain.registration.rules import REQUIREMENT_KEYS, Address, Evaluation, Requirement
from domain.shared.errors import FieldViolation, InvalidArgument
from entrepot.platform.v1 import types_pb2
from entrepot.registration.v1 import registration_pb2 as pb
from server.convert import ts


def to_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def enum_value(enum: Any, prefix: str, name: str) -> Any:
    return int(enum.Value(prefix + name.upper())) if name else 0


def enum_str(enum: Any, prefix: str, value: int) -> str:
    """Enum number -> domain name; an unknown number becomes a name the domain rejects."""
    if value == 0:
        return ""
    try:
        return str(enum.Name(value))[len(prefix) :].lower()
    except ValueError:
        return f"unknown({value})"


# ------------------------------------------------------------------ addresses and answers


def address_from_proto(a: types_pb2.PostalAddress) -> Address:
    return Address(
        country_code=a.country_code.strip().upper(),
        state=a.state,
        county=a.county,
        city=a.city,
        postal_code=a.postal_code,
        line1=a.line1,
        line2=a.line2,
    )


def address_to_proto(d: dict[str, str] | Address) -> types_pb2.PostalAddress:
    a = d if isinstance(d, Address) else Address.from_dict(d)
    return types_pb2.PostalAddress(**a.as_dict())


def answer_from_proto(key: str, v: pb.FieldValue) -> Answer:
    kind = v.WhichOneof("value")
    if kind == "text":
        return v.text
    if kind == "choices":
        return list(v.choices.values)
    if kind == "flag":
        return v.flag
    if kind == "address":
        return address_from_proto(v.address).as_dict()
    raise InvalidArgument("ANSWER_EMPTY", f"answer {key!r} carries no value")


def answer_to_proto(value: Answer) -> pb.FieldValue:
    if isinstance(value, bool):
        return pb.FieldValue(flag=value)
    if isinstance(value, str):
        return pb.FieldValue(text=value)
    if isinstance(value, list):
        return pb.FieldValue(choices=pb.StringList(values=value))
    return pb.FieldValue(address=address_to_proto(value))


# ------------------------------------------------------------------ forms, rules, catalog


COMMERCE_MODE_TO_PB = {
    "b2b": pb.COMMERCE_MODE_B2B,
    "b2c": pb.COMMERCE_MODE_B2C,
    "both": pb.COMMERCE_MODE_BOTH,
}
COMMERCE_MODE_FROM_PB: dict[int, str] = {int(v): k for k, v in COMMERCE_MODE_TO_PB.items()}


def commerce_mode(value: int, field: str, *, registering: bool = False) -> str:
    """The domain's commerce mode of a CommerceMode field ("" when unspecified).
    A registration is made in B2B or B2C, never BOTH."""
    mode = COMMERCE_MODE_FROM_PB.get(value, "") if value else ""
    if (value and not mode) or (registering and mode == "both"):
        allowed = "B2B or B2C" if registering else "B2B, B2C or BOTH"
        raise InvalidArgument(
            "INVALID_ARGUMENT",
            f"{field} must be {allowed}",
            field_violations=[FieldViolation(field, f"must be {allowed}")],
        )
    return mode


def form_to_proto(f: catalog.Form) -> pb.RegistrationForm:
    out = pb.RegistrationForm(
        id=f.id,
        slug=f.slug,
        channel=f.channel,
        name=f.name,
        description=f.description,
        version=f.version,
        customer_group=f.customer_group,
        invitation_required=f.invitation_required,
        active=f.active,
        create_time=ts(f.created_at),
        update_time=ts(f.updated_at),
        commerce_mode=COMMERCE_MODE_TO_PB[f.commerce_mode],
    )
    for step in f.steps:
        json_format.ParseDict(step, out.steps.add())
    out.expire_after.FromSeconds(f.expire_after_seconds)
    return out


def requirement_to_proto(r: Requirement) -> pb.Requirement:
    return pb.Requirement(**{REQUIREMENT_KEYS[r.kind]: r.code})


def rule_to_proto(rec: catalog.RuleRecord) -> pb.RegistrationRule:
    r = rec.rule
    out = pb.RegistrationRule(
        id=r.id,
        channel=rec.channel,
        name=r.name,
        type=enum_value(pb.RegistrationRule.Type, "TYPE_", r.type),
        reason=r.reason,
        priority=r.priority,
        form_id=r.form_id,
        active=r.active,
        create_time=ts(rec.created_at),
    )
    json_format.ParseDict(rec.geo, out.geo)
    json_format.ParseDict(rec.requirements, out.requirements)
    return out


def evaluation_to_proto(ev: Evaluation) -> pb.EvaluateRegistrationRulesResponse:
    out = pb.EvaluateRegistrationRulesResponse(
        blocked=ev.blocked,
        blocking_rule_id=ev.blocking_rule.id if ev.blocking_rule else "",
        block_reason=ev.reason,
        applied_rule_ids=[r.id for r in ev.applied],
        exempted_rule_ids=[r.id for r in ev.exempted],
    )
    if not ev.requirements.is_empty():
        json_format.ParseDict(ev.requirements.as_dict(), out.requirements)
    return out


def document_type_to_proto(d: catalog.DocumentType) -> pb.DocumentType:
    return pb.DocumentType(
        code=d.code,
        name=d.name,
        description=d.description,
        allowed_content_types=list(d.allowed_content_types),
        max_size_bytes=d.max_size_bytes,
        requires_expiration_date=d.requires_expiration_date,
        requires_number=d.requires_number,
        requires_issuing_authority=d.requires_issuing_authority,
        active=d.active,
        create_time=ts(d.created_at),
        update_time=ts(d.updated_at),
    )


def document_type_values(d: pb.DocumentType) -> dict[str, Any]:
    return {
        "name": d.name,
        "description": d.description,
        "allowed_content_types": [c.strip().lower() for c in d.allowed_content_types],
        "max_size_bytes": d.max_size_bytes,
        "requires_expiration_date": d.requires_expiration_date,
        "requires_number": d.requires_number,
        "requires_issuing_authority": d.requires_issuing_authority,
        "active": d.active,
    }


def agreement_to_proto(a: catalog.AgreementTemplate) -> pb.AgreementTemplate:
    return pb.AgreementTemplate(
        code=a.code,
        version=a.version,
        title=a.title,
        body=a.body,
        body_sha256=a.body_sha256,
        signature_required=a.signature_required,
        create_time=ts(a.created_at),
    )


def invitation_to_proto(c: catalog.InvitationCode) -> pb.InvitationCode:
    return pb.InvitationCode(
        code=c.code,
        form_id=c.form_id,
        customer_group=c.customer_group,
        max_uses=c.max_uses,
        uses=c.uses,
        expire_time=ts(c.expires_at),
        active=c.active,
        create_time=ts(c.created_at),
    )


# ------------------------------------------------------------------ registrations


def state_to_proto(state: str) -> Any:
    return enum_value(pb.Registration.State, "STATE_", state)


def state_from_proto(value: int) -> str:
    return enum_str(pb.Registration.State, "STATE_", value)


def document_to_proto(d: submissions.Document) -> pb.RegistrationDocument:
    out = pb.RegistrationDocument(
        id=d.id,
        registration_id=d.registration_id,
        document_type_code=d.document_type_code,
        filename=d.filename,
        content_type=d.content_type,
        size_bytes=d.size_bytes,
        sha256=d.sha256,
        number=d.number,
        issuing_authority=d.issuing_authority,
        expiration_date=d.expiration_date,
        create_time=ts(d.created_at),
    )
    v = d.verification
    if v is not None:
        out.verification.CopyFrom(
            pb.DocumentVerification(
                status=enum_value(pb.DocumentVerification.Status, "STATUS_", v.status),
                ocr_strategy=v.ocr_strategy,
                verification_strategy=v.verification_strategy,
                confidence_bps=v.confidence_bps,
                extracted_fields=v.extracted,
                note=v.note,
                update_time=ts(v.updated_at),
            )
        )
    return out


def signature_to_proto(s: submissions.Signature) -> pb.AgreementSignature:
    return pb.AgreementSignature(
        id=s.id,
        registration_id=s.registration_id,
        agreement_code=s.agreement_code,
        agreement_version=s.agreement_version,
        method=enum_value(pb.SignatureMethod, "SIGNATURE_METHOD_", s.method),
        signer_name=s.signer_name,
        signer_email=s.signer_email,
        ip_address=s.ip_address,
        user_agent=s.user_agent,
        content_sha256=s.content_sha256,
        external_reference=s.external_reference,
        provider=s.provider,
        sign_time=ts(s.signed_at),
    )


def registration_to_proto(r: submissions.Registration) -> pb.Registration:
    out = pb.Registration(
        id=r.id,
        channel=r.channel,
        form_id=r.form_id,
        form_version=r.form_version,
        state=state_to_proto(r.state),
        address=address_to_proto(r.address),
        invitation_code=r.invitation_code,
        customer_group=r.customer_group,
        requirement_status=pb.RequirementStatus(
            satisfied=r.satisfied, missing=[requirement_to_proto(m) for m in r.missing]
        ),
        decision=enum_value(pb.Registration.Decision, "DECISION_", r.decision),
        decision_note=r.decision_note,
        reviewer=r.reviewer,
        expire_time=ts(r.expires_at),
        create_time=ts(r.created_at),
        update_time=ts(r.updated_at),
        documents=[document_to_proto(d) for d in r.documents],
        signatures=[signature_to_proto(s) for s in r.signatures],
        history=[
            pb.RegistrationEvent(
                from_state=state_to_proto(h.from_state),
                to_state=state_to_proto(h.to_state),
                actor=h.actor,
                note=h.note,
                time=ts(h.at),
            )
            for h in r.history
        ],
    )
    for key, value in r.answers.items():
        out.answers[key].CopyFrom(answer_to_proto(value))
    json_format.ParseDict(r.requirements, out.requirements)
    a = r.account
    if a is not None:
        out.account.CopyFrom(
            pb.Account(
                id=a.id,
                status=enum_value(pb.Account.Status, "STATUS_", a.status),
                company_name=a.company_name,
                email=a.email,
                customer_group=a.customer_group,
                address=address_to_proto(a.address),
                attributes=a.attributes,
                create_time=ts(a.created_at),
                update_time=ts(a.updated_at),
            )
        )
    return out
