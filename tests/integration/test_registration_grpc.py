"""RegistrationService from a caller's side: real gRPC server on loopback, real
PostgreSQL, real Temporal dev server and worker (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import WorkflowHistory
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from domain.registration import WORKFLOWS
from entrepot.platform.v1 import channel_pb2, types_pb2
from entrepot.registration.v1 import registration_pb2 as pb
from entrepot_client import (
    AlreadyExistsError,
    Entrepot,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from entrepot_client.registration import answers, upload_document, wait_for_state
from server.app import App
from server.metrics import RPC_TOTAL
from server.settings import Settings
from tests.conftest import unique

S = pb.Registration
PDF = b"%PDF-1.7\n" + b"x" * 1000
LIMIT = 64 * 1024
WORKFLOW_IDS: list[str] = []


def rid() -> str:
    return str(uuid.uuid4())


US_NY = types_pb2.PostalAddress(
    line1="1 Broadway", city="New York", state="NY", postal_code="10004", country_code="US"
)
US_LA = types_pb2.PostalAddress(
    line1="1 Main", city="Los Angeles", state="CA", postal_code="90012", country_code="US"
)
US_SF = types_pb2.PostalAddress(
    line1="1 Market", city="San Francisco", state="CA", postal_code="94105", country_code="US"
)
FR = types_pb2.PostalAddress(line1="1 rue de Rivoli", city="Paris", postal_code="75001", country_code="FR")


@pytest.fixture(scope="module")
async def catalog_codes(
    target: str, make_token: Callable[..., str], test_channel: str
) -> AsyncIterator[dict[str, str]]:
    """A document type (PDF, 64 KiB) and an agreement needing a signature, unique to this module."""
    codes = {"license": unique("license"), "terms": unique("terms")}
    async with Entrepot(target, make_token(), test_channel) as ep:
        await ep.registration.create_document_type(
            pb.CreateDocumentTypeRequest(
                document_type=pb.DocumentType(
                    code=codes["license"],
                    name="Tobacco license",
                    allowed_content_types=["application/pdf"],
                    max_size_bytes=LIMIT,
                    active=True,
                ),
                request_id=rid(),
            )
        )
        await ep.registration.create_agreement_template(
            pb.CreateAgreementTemplateRequest(
                agreement=pb.AgreementTemplate(
                    code=codes["terms"], title="Trade terms", body="Terms v1", signature_required=True
                ),
                request_id=rid(),
            )
        )
    yield codes


def steps(extra: list[pb.FormField] | None = None) -> list[pb.FormStep]:
    fields = [
        pb.FormField(
            key="company",
            label="Company",
            type=pb.FIELD_TYPE_TEXT,
            required=True,
            maps_to=pb.FieldMapping(target=pb.FieldMapping.TARGET_ACCOUNT, path="company_name"),
        ),
        pb.FormField(
            key="email",
            label="Email",
            type=pb.FIELD_TYPE_EMAIL,
            required=True,
            maps_to=pb.FieldMapping(target=pb.FieldMapping.TARGET_ACCOUNT, path="email"),
        ),
        pb.FormField(
            key="kind",
            label="Kind",
            type=pb.FIELD_TYPE_RADIO,
            required=True,
            options=[pb.FieldOption(value="retailer"), pb.FieldOption(value="distributor")],
        ),
        pb.FormField(
            key="vat",
            label="VAT number",
            type=pb.FIELD_TYPE_TAX_ID,
            visible_when=pb.VisibilityCondition(
                clauses=[
                    pb.VisibilityCondition.Clause(
                        field_key="kind",
                        operator=pb.VisibilityCondition.OPERATOR_EQUALS,
                        values=["distributor"],
                    )
                ]
            ),
        ),
        *(extra or []),
    ]
    return [
        pb.FormStep(key="main", title="Main", sections=[pb.FormSection(key="s", title="S", fields=fields)])
    ]


async def make_form(
    ep: Entrepot, *, expire_seconds: int = 3600, invitation: bool = False, commerce_mode: int = 0
) -> pb.RegistrationForm:
    form = pb.RegistrationForm(
        slug=unique("form"),
        name="Wholesale",
        customer_group="wholesale",
        invitation_required=invitation,
        steps=steps(),
        active=True,
        commerce_mode=commerce_mode,  # type: ignore[arg-type]
    )
    form.expire_after.FromSeconds(expire_seconds)
    return await ep.registration.create_registration_form(
        pb.CreateRegistrationFormRequest(form=form, request_id=rid())
    )


def good_answers(**over: Any) -> dict[str, pb.FieldValue]:
    return answers(**{"company": "Acme", "email": "buyer@acme.test", "kind": "retailer", **over})


async def submit(
    ep: Entrepot, form: pb.RegistrationForm, address: types_pb2.PostalAddress = FR, **kw: Any
) -> pb.Registration:
    reg = await ep.registration.submit_registration(
        pb.SubmitRegistrationRequest(
            form=form.slug,
            answers=kw.pop("answers", None) or good_answers(),
            address=address,
            request_id=kw.pop("request_id", None) or rid(),
            **kw,
        ),
        timeout=60,  # generous: the race test runs 50 at once on a small, shared machine
    )
    WORKFLOW_IDS.append(f"registration-{reg.id}")
    return reg


async def add_rule(ep: Entrepot, form: pb.RegistrationForm, **rule: Any) -> pb.RegistrationRule:
    return await ep.registration.create_registration_rule(
        pb.CreateRegistrationRuleRequest(
            rule=pb.RegistrationRule(form_id=form.id, active=True, name=rule.pop("name", "rule"), **rule),
            request_id=rid(),
        )
    )


def doc_req(code: str) -> pb.Requirement:
    return pb.Requirement(document_type_code=code)


# ------------------------------------------------------------------ invitation codes


async def test_fifty_concurrent_submissions_redeem_a_five_use_code_exactly_five_times(
    admin: Entrepot, sessions: async_sessionmaker[AsyncSession]
) -> None:
    form = await make_form(admin, invitation=True)
    code = unique("CODE")
    await admin.registration.create_invitation_code(
        pb.CreateInvitationCodeRequest(
            invitation_code=pb.InvitationCode(
                code=code, form_id=form.id, customer_group="vip", max_uses=5, active=True
            ),
            request_id=rid(),
        )
    )

    async def applicant() -> pb.Registration:
        # What a real caller does: on UNAVAILABLE (pool exhausted on a loaded
        # machine), retry with the same request_id, which the server deduplicates.
        request_id = rid()
        for _ in range(10):
            try:
                return await submit(admin, form, invitation_code=code, request_id=request_id)
            except UnavailableError:
                await asyncio.sleep(0.5)
        return await submit(admin, form, invitation_code=code, request_id=request_id)

    results = await asyncio.gather(*(applicant() for _ in range(50)), return_exceptions=True)
    ok = [r for r in results if isinstance(r, pb.Registration)]
    refused = [r for r in results if not isinstance(r, pb.Registration)]
    assert len(ok) == 5
    assert all(
        isinstance(e, FailedPreconditionError) and e.reason == "INVITATION_CODE_EXHAUSTED" for e in refused
    )
    assert {r.customer_group for r in ok} == {"vip"}
    got = await admin.registration.get_invitation_code(pb.GetInvitationCodeRequest(code=code))
    assert got.uses == 5
    listed = await admin.registration.list_registrations(
        pb.ListRegistrationsRequest(form_id=form.id, page_size=100)
    )
    assert len(listed.registrations) == 5
    async with sessions() as s:
        n = (
            await s.execute(
                text("SELECT count(*) FROM registration.invitation_redemptions WHERE code = :c"), {"c": code}
            )
        ).scalar_one()
    assert n == 5
    with pytest.raises(InvalidArgumentError) as exc:
        await submit(admin, form)  # the form requires a code
    assert "invitation_code" in {v.field for v in exc.value.field_violations}


# ------------------------------------------------------------------ geo rules


async def test_block_exempt_and_and_or_requirements(admin: Entrepot, catalog_codes: dict[str, str]) -> None:
    form = await make_form(admin)
    lic, terms = catalog_codes["license"], catalog_codes["terms"]
    block = await add_rule(
        admin,
        form,
        name="no NY",
        type=pb.RegistrationRule.TYPE_BLOCK,
        geo=pb.GeoCondition(countries=["US"], states=["NY"]),
        reason="We are not licensed to sell in New York",
    )
    us = await add_rule(
        admin,
        form,
        name="US license",
        type=pb.RegistrationRule.TYPE_REQUIRE,
        geo=pb.GeoCondition(countries=["US"]),
        requirements=pb.RequirementGroup(requirements=[doc_req(lic)]),
    )
    exempt = await add_rule(
        admin,
        form,
        name="LA downtown exempt",
        type=pb.RegistrationRule.TYPE_EXEMPT,
        geo=pb.GeoCondition(
            countries=["US"],
            postal_codes=[pb.PostalCodeMatch(range=pb.PostalCodeMatch.Range(first="90000", last="90099"))],
        ),
    )
    # FR: license AND (signed terms OR a VAT number)
    fr = await add_rule(
        admin,
        form,
        name="FR",
        type=pb.RegistrationRule.TYPE_REQUIRE,
        geo=pb.GeoCondition(countries=["FR"]),
        requirements=pb.RequirementGroup(
            operator=pb.RequirementGroup.OPERATOR_ALL,
            requirements=[doc_req(lic)],
            groups=[
                pb.RequirementGroup(
                    operator=pb.RequirementGroup.OPERATOR_ANY,
                    requirements=[pb.Requirement(agreement_code=terms), pb.Requirement(field_key="vat")],
                )
            ],
        ),
    )

    async def evaluate(address: types_pb2.PostalAddress) -> pb.EvaluateRegistrationRulesResponse:
        return await admin.registration.evaluate_registration_rules(
            pb.EvaluateRegistrationRulesRequest(address=address, form_id=form.id)
        )

    ny = await evaluate(US_NY)
    assert ny.blocked and ny.blocking_rule_id == block.id and "New York" in ny.block_reason
    la = await evaluate(US_LA)
    assert not la.blocked and list(la.exempted_rule_ids) == [us.id] and not la.requirements.groups
    sf = await evaluate(US_SF)
    assert not sf.blocked and list(sf.applied_rule_ids) == [us.id]
    assert sf.requirements.groups[0].requirements[0].document_type_code == lic
    paris = await evaluate(FR)
    assert list(paris.applied_rule_ids) == [fr.id]
    del exempt

    with pytest.raises(FailedPreconditionError) as exc:
        await submit(admin, form, US_NY)
    assert exc.value.reason == "REGISTRATION_BLOCKED"
    assert exc.value.metadata["rule_id"] == block.id

    exempted = await submit(admin, form, US_LA)
    assert (await wait_for_state(admin, exempted.id, [S.STATE_IN_REVIEW])).requirement_status.satisfied

    # FR without VAT: needs the license and the signed terms.
    reg = await submit(admin, form, FR)
    reg = await wait_for_state(admin, reg.id, [S.STATE_DOCUMENTS_PENDING])
    missing = {(m.document_type_code, m.agreement_code, m.field_key) for m in reg.requirement_status.missing}
    assert missing == {(lic, "", ""), ("", terms, ""), ("", "", "vat")}
    await upload_document(admin, reg.id, lic, "license.pdf", "application/pdf", PDF)
    reg = await admin.registration.get_registration(pb.GetRegistrationRequest(id=reg.id))
    assert reg.state == S.STATE_DOCUMENTS_PENDING and not reg.requirement_status.satisfied
    await admin.registration.sign_agreement(
        pb.SignAgreementRequest(
            registration_id=reg.id,
            agreement_code=terms,
            method=pb.SIGNATURE_METHOD_TYPED,
            signer_name="Ann Buyer",
            signature=b"Ann Buyer",
            request_id=rid(),
        )
    )
    await wait_for_state(admin, reg.id, [S.STATE_IN_REVIEW])

    # FR distributor with a VAT number: the license alone completes it (the OR branch).
    vat_reg = await submit(admin, form, FR, answers=good_answers(kind="distributor", vat="FR12345678901"))
    await upload_document(admin, vat_reg.id, lic, "license.pdf", "application/pdf", PDF)
    await wait_for_state(admin, vat_reg.id, [S.STATE_IN_REVIEW])


# ------------------------------------------------------------------ uploads


async def test_upload_limits_and_types(
    admin: Entrepot, catalog_codes: dict[str, str], sessions: async_sessionmaker[AsyncSession]
) -> None:
    lic = catalog_codes["license"]
    form = await make_form(admin)
    reg = await submit(admin, form)
    sent = 0
    total_chunks = 200

    async def oversized() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b"%PDF-1.7\n" + b"a" * (16 * 1024 - 9)
        sent = 1
        for _ in range(total_chunks - 1):
            await asyncio.sleep(0.005)  # a slow client: the server stops it long before the end
            sent += 1
            yield b"b" * 16 * 1024

    method = "/entrepot.registration.v1.RegistrationService/UploadRegistrationDocument"
    refused = RPC_TOTAL.labels(method, "RESOURCE_EXHAUSTED")
    before = refused._value.get()
    with pytest.raises((ResourceExhaustedError, InternalError)) as exc:
        await upload_document(admin, reg.id, lic, "big.pdf", "application/pdf", oversized())
    if isinstance(exc.value, ResourceExhaustedError):
        assert exc.value.reason == "DOCUMENT_TOO_LARGE"
    else:
        # grpc-python race: when the server ends the call while the client is inside a
        # write, the client reports "Internal error from Core" instead of the server's
        # status. What the server answered is asserted below either way.
        assert exc.value.message == "Internal error from Core", exc.value
    assert refused._value.get() == before + 1, "the server did not answer RESOURCE_EXHAUSTED"
    assert sent < total_chunks // 2, f"the client sent {sent} chunks before the server refused"

    with pytest.raises(InvalidArgumentError) as exc2:
        await upload_document(admin, reg.id, lic, "photo.png", "image/png", b"\x89PNG\r\n\x1a\n" + b"p" * 100)
    assert exc2.value.reason == "DOCUMENT_TYPE_NOT_ALLOWED"
    with pytest.raises(InvalidArgumentError) as exc3:
        await upload_document(
            admin, reg.id, lic, "fake.pdf", "application/pdf", b"MZ\x90\x00 not a pdf at all"
        )
    assert exc3.value.reason == "DOCUMENT_CONTENT_MISMATCH"

    async with sessions() as s:
        docs = (
            await s.execute(
                text("SELECT count(*) FROM registration.documents WHERE registration_id = :r"), {"r": reg.id}
            )
        ).scalar_one()
        blobs = (
            await s.execute(
                text("SELECT count(*) FROM registration.document_blobs WHERE key LIKE :k"),
                {"k": f"registration/{reg.id}/%"},
            )
        ).scalar_one()
    assert docs == 0 and blobs == 0

    request_id = rid()
    doc = await upload_document(
        admin, reg.id, lic, "ok.pdf", "application/pdf", PDF, request_id=request_id, chunk_size=100
    )
    assert doc.sha256 == hashlib.sha256(PDF).hexdigest() and doc.size_bytes == len(PDF)
    again = await upload_document(admin, reg.id, lic, "ok.pdf", "application/pdf", PDF, request_id=request_id)
    assert again.id == doc.id  # same upload retried: the same document
    WORKFLOW_IDS.append(f"document-verification-{doc.id}")
    async with sessions() as s:
        stored = (
            await s.execute(
                text(
                    "SELECT b.content FROM registration.documents d JOIN registration.document_blobs b "
                    "ON b.key = d.storage_key WHERE d.id = :d"
                ),
                {"d": doc.id},
            )
        ).scalar_one()
    assert bytes(stored) == PDF
    for _ in range(100):
        got = await admin.registration.get_registration(pb.GetRegistrationRequest(id=reg.id))
        ver = got.documents[0].verification
        if ver.status == pb.DocumentVerification.STATUS_MANUAL_REVIEW:
            break
        await asyncio.sleep(0.1)
    assert ver.status == pb.DocumentVerification.STATUS_MANUAL_REVIEW
    assert (
        ver.ocr_strategy == "none"
        and ver.verification_strategy == "manual_review"
        and ver.confidence_bps == 0
    )


async def test_nul_in_any_text_field_is_invalid_text_naming_the_field(
    admin: Entrepot, catalog_codes: dict[str, str]
) -> None:
    """RegistrationService requests pass the pipeline's text stage: a NUL character anywhere
    (top level, repeated, nested message, map key or value, an upload's header) is refused
    before the database with INVALID_TEXT naming the field. Other services leave it to the
    database (SQLSTATE class 22: INVALID_VALUE)."""

    async def refused(call: Any) -> InvalidArgumentError:
        with pytest.raises(InvalidArgumentError) as exc:
            await call
        assert exc.value.reason == "INVALID_TEXT", exc.value
        return exc.value

    def doc_type(**over: Any) -> pb.CreateDocumentTypeRequest:
        fields: dict[str, Any] = {"code": unique("nul"), "name": "N", "max_size_bytes": LIMIT, **over}
        return pb.CreateDocumentTypeRequest(document_type=pb.DocumentType(**fields), request_id=rid())

    top = await refused(admin.registration.create_document_type(doc_type(name="Li\x00cense")))
    assert (top.message, top.metadata) == (
        "document_type.name contains a NUL character",
        {"field": "document_type.name"},
    )
    rep = await refused(
        admin.registration.create_document_type(doc_type(allowed_content_types=["application/pdf\x00"]))
    )
    assert rep.message == "document_type.allowed_content_types contains a NUL character"
    form = await make_form(admin)
    value = await refused(submit(admin, form, answers=good_answers(company="Ac\x00me")))
    assert (value.message, value.metadata) == (
        "answers[company].text contains a NUL character",
        {"field": "answers[company].text"},
    )
    key = await refused(
        submit(admin, form, answers={**good_answers(), "co\x00mpany": pb.FieldValue(text="x")})
    )
    assert (key.message, key.metadata) == ("answers has a key with a NUL character", {})
    nested = await refused(
        submit(admin, form, address=types_pb2.PostalAddress(city="Pa\x00ris", country_code="FR"))
    )
    assert nested.message == "address.city contains a NUL character"
    reg = await submit(admin, form)
    header = await refused(
        upload_document(admin, reg.id, catalog_codes["license"], "l\x00.pdf", "application/pdf", PDF)
    )
    assert (header.message, header.metadata) == (
        "header.filename contains a NUL character",
        {"field": "header.filename"},
    )
    # A read goes through the stage as well.
    read = await refused(
        admin.registration.get_registration_form(pb.GetRegistrationFormRequest(slug="f\x00"))
    )
    assert read.message == "slug contains a NUL character"
    # Not every service: the channel service leaves it to the database.
    with pytest.raises(InvalidArgumentError) as other:
        await admin.channel.create_channel(
            channel_pb2.CreateChannelRequest(
                channel=channel_pb2.Channel(slug=unique("nul"), name="N\x00", currency="EUR"),
                request_id=rid(),
            )
        )
    assert other.value.reason == "INVALID_VALUE"


# ------------------------------------------------------------------ signatures


async def test_sign_agreement_records_peer_user_agent_and_hash(
    admin: Entrepot, catalog_codes: dict[str, str]
) -> None:
    terms = catalog_codes["terms"]
    form = await make_form(admin)
    reg = await submit(admin, form)
    sig = await admin.registration.sign_agreement(
        pb.SignAgreementRequest(
            registration_id=reg.id,
            agreement_code=terms,
            method=pb.SIGNATURE_METHOD_DRAWN,
            signer_name="Ann Buyer",
            signer_email="ann@acme.test",
            signature=b"\x89PNG drawn",
            request_id=rid(),
        )
    )
    assert sig.ip_address == "127.0.0.1"
    assert "grpc" in sig.user_agent.lower()
    template = await admin.registration.get_agreement_template(pb.GetAgreementTemplateRequest(code=terms))
    h = hashlib.sha256()
    for part in (
        terms.encode(),
        b"1",
        template.body_sha256.encode(),
        b"drawn",
        b"Ann Buyer",
        b"\x89PNG drawn",
    ):
        h.update(len(part).to_bytes(8, "big") + part)
    assert sig.content_sha256 == h.hexdigest() and sig.agreement_version == 1 and sig.provider == "builtin"
    with pytest.raises(FailedPreconditionError) as exc:
        await admin.registration.sign_agreement(
            pb.SignAgreementRequest(
                registration_id=reg.id,
                agreement_code=terms,
                method=pb.SIGNATURE_METHOD_CHECKBOX,
                signer_name="Ann",
                request_id=rid(),
            )
        )
    assert exc.value.reason == "SIGNATURE_REQUIRED"
    v2 = await admin.registration.update_agreement_template(
        pb.UpdateAgreementTemplateRequest(
            agreement=pb.AgreementTemplate(
                code=terms, title="Trade terms", body="Terms v2", signature_required=True
            ),
            request_id=rid(),
        )
    )
    assert v2.version == 2
    with pytest.raises(FailedPreconditionError) as exc2:
        await admin.registration.sign_agreement(
            pb.SignAgreementRequest(
                registration_id=reg.id,
                agreement_code=terms,
                agreement_version=1,
                method=pb.SIGNATURE_METHOD_TYPED,
                signer_name="Ann",
                signature=b"Ann",
                request_id=rid(),
            )
        )
    assert exc2.value.reason == "AGREEMENT_VERSION_OUTDATED"


# ------------------------------------------------------------------ lifecycle


async def test_sign_agreement_believes_x_forwarded_for_only_from_a_trusted_proxy(
    admin: Entrepot,
    catalog_codes: dict[str, str],
    settings: Settings,
    temporal_env: WorkflowEnvironment,
    make_token: Callable[..., str],
) -> None:
    """Envoy appends the client's address to x-forwarded-for; a replica told the proxy's address
    (ENTREPOT_TRUSTED_PROXIES) records that client, skipping trusted hops from the right, and
    never what a client wrote into the header itself. Untrusted peers are taken as they are."""

    def sign(reg: pb.Registration) -> pb.SignAgreementRequest:
        return pb.SignAgreementRequest(
            registration_id=reg.id,
            agreement_code=catalog_codes["terms"],
            method=pb.SIGNATURE_METHOD_TYPED,
            signer_name="Ann Buyer",
            signer_email="ann@acme.test",
            signature=b"Ann Buyer",
            request_id=rid(),
        )

    # Spoofed by a direct caller: the default server trusts no proxy, 127.0.0.1 is recorded.
    form = await make_form(admin)
    direct = await admin.registration.sign_agreement(
        sign(await submit(admin, form)), metadata=[("x-forwarded-for", "198.51.100.9")]
    )
    assert direct.ip_address == "127.0.0.1"

    behind = App(settings.model_copy(update={"trusted_proxies": "127.0.0.1/32, 10.1.0.0/16"}))
    behind.rt._temporal = temporal_env.client
    await behind.start()
    try:
        async with Entrepot(f"127.0.0.1:{behind.port}", make_token(), "test") as proxied:
            # client wrote 198.51.100.9; the edge proxy saw 203.0.113.7; an inner proxy 10.1.2.3.
            chain = "198.51.100.9, 203.0.113.7, 10.1.2.3"
            sig = await proxied.registration.sign_agreement(
                sign(await submit(admin, form)), metadata=[("x-forwarded-for", chain)]
            )
            assert sig.ip_address == "203.0.113.7"
            # No header from the trusted proxy: its own address.
            plain = await proxied.registration.sign_agreement(sign(await submit(admin, form)))
            assert plain.ip_address == "127.0.0.1"
    finally:
        await behind.stop(grace=1.0)


def history(reg: pb.Registration) -> list[tuple[int, int]]:
    return [(h.from_state, h.to_state) for h in reg.history]


async def test_approve_and_deny_paths(
    admin: Entrepot, client_factory: Callable[..., Entrepot], catalog_codes: dict[str, str]
) -> None:
    reviewer = client_factory(permissions=["registration.review", "registration.read"], sub="reviewer-7")
    intruder = client_factory(permissions=["registration.read", "registration.submit"], sub="applicant")
    form = await make_form(admin)
    await add_rule(
        admin,
        form,
        type=pb.RegistrationRule.TYPE_REQUIRE,
        geo=pb.GeoCondition(countries=["FR"]),
        requirements=pb.RequirementGroup(requirements=[doc_req(catalog_codes["license"])]),
    )
    approved = await submit(admin, form)
    denied = await submit(admin, form)
    assert approved.account.status == pb.Account.STATUS_PENDING and approved.account.company_name == "Acme"
    await wait_for_state(admin, approved.id, [S.STATE_DOCUMENTS_PENDING])

    with pytest.raises(PermissionDeniedError):
        await intruder.registration.review_registration(
            pb.ReviewRegistrationRequest(
                registration_id=approved.id, decision=S.DECISION_APPROVE, request_id=rid()
            )
        )
    with pytest.raises(FailedPreconditionError) as exc:
        await reviewer.registration.review_registration(
            pb.ReviewRegistrationRequest(
                registration_id=approved.id, decision=S.DECISION_APPROVE, request_id=rid()
            )
        )
    assert exc.value.reason == "REQUIREMENTS_NOT_MET"

    await upload_document(admin, approved.id, catalog_codes["license"], "l.pdf", "application/pdf", PDF)
    await wait_for_state(admin, approved.id, [S.STATE_IN_REVIEW])
    review_id = rid()
    decided = await reviewer.registration.review_registration(
        pb.ReviewRegistrationRequest(
            registration_id=approved.id, decision=S.DECISION_APPROVE, note="looks good", request_id=review_id
        )
    )
    assert decided.decision == S.DECISION_APPROVE and decided.reviewer == "reviewer-7"
    final = await wait_for_state(admin, approved.id, [S.STATE_APPROVED])
    assert final.account.status == pb.Account.STATUS_ACTIVE and final.account.customer_group == "wholesale"
    assert history(final) == [
        (S.STATE_UNSPECIFIED, S.STATE_SUBMITTED),
        (S.STATE_SUBMITTED, S.STATE_DOCUMENTS_PENDING),
        (S.STATE_DOCUMENTS_PENDING, S.STATE_IN_REVIEW),
        (S.STATE_IN_REVIEW, S.STATE_APPROVED),
    ]
    assert final.history[-1].actor == "reviewer-7" and final.history[-1].note == "looks good"
    # The same review retried answers the same; the registration stays approved.
    again = await reviewer.registration.review_registration(
        pb.ReviewRegistrationRequest(
            registration_id=approved.id, decision=S.DECISION_APPROVE, note="looks good", request_id=review_id
        )
    )
    assert again.decision == S.DECISION_APPROVE

    await reviewer.registration.review_registration(
        pb.ReviewRegistrationRequest(
            registration_id=denied.id, decision=S.DECISION_DENY, note="no", request_id=rid()
        )
    )
    final = await wait_for_state(admin, denied.id, [S.STATE_DENIED])
    assert final.account.status == pb.Account.STATUS_DENIED
    assert history(final)[-1] == (S.STATE_DOCUMENTS_PENDING, S.STATE_DENIED)
    with pytest.raises(FailedPreconditionError) as exc2:
        await reviewer.registration.review_registration(
            pb.ReviewRegistrationRequest(
                registration_id=denied.id, decision=S.DECISION_APPROVE, request_id=rid()
            )
        )
    assert exc2.value.reason == "REGISTRATION_CLOSED"
    inbox = await reviewer.registration.list_registrations(
        pb.ListRegistrationsRequest(form_id=form.id, states=[S.STATE_APPROVED, S.STATE_DENIED])
    )
    assert {r.id for r in inbox.registrations} == {approved.id, denied.id}


async def test_expire_on_the_forms_timer(admin: Entrepot) -> None:
    # A short real timer (the form's expire_after): the time-skipping test server
    # would have to be downloaded, which this machine does not do.
    form = await make_form(admin, expire_seconds=2)
    reg = await submit(admin, form)
    final = await wait_for_state(admin, reg.id, [S.STATE_EXPIRED], timeout=20)
    assert final.account.status == pb.Account.STATUS_EXPIRED
    assert history(final)[-1] == (S.STATE_IN_REVIEW, S.STATE_EXPIRED)
    assert final.history[-1].actor == "system:workflow"


async def test_submit_is_idempotent_by_request_id(admin: Entrepot) -> None:
    form = await make_form(admin)
    request_id = rid()
    first, second = await asyncio.gather(
        submit(admin, form, request_id=request_id), submit(admin, form, request_id=request_id)
    )
    third = await submit(admin, form, request_id=request_id)
    assert first.id == second.id == third.id
    listed = await admin.registration.list_registrations(pb.ListRegistrationsRequest(form_id=form.id))
    assert [r.id for r in listed.registrations] == [first.id]
    with pytest.raises(AlreadyExistsError) as exc:
        await submit(admin, form, request_id=request_id, answers=good_answers(company="Other"))
    assert exc.value.reason == "REQUEST_ID_REUSED"


async def test_form_versions_and_validation(admin: Entrepot) -> None:
    form = await make_form(admin)
    reg_v1 = await submit(admin, form)
    updated = await admin.registration.update_registration_form(
        pb.UpdateRegistrationFormRequest(
            form=pb.RegistrationForm(
                id=form.id,
                steps=steps(
                    [pb.FormField(key="website", label="Web", type=pb.FIELD_TYPE_URL, required=True)]
                ),
            ),
            update_mask={"paths": ["steps"]},
            request_id=rid(),
        )
    )
    assert updated.version == 2 and updated.name == form.name
    v1 = await admin.registration.get_registration_form(
        pb.GetRegistrationFormRequest(slug=form.slug, version=1)
    )
    assert len(v1.steps[0].sections[0].fields) == 4
    with pytest.raises(InvalidArgumentError) as exc:
        await submit(admin, form, answers=good_answers(email="not-an-email", website="ftp://x", bogus="1"))
    assert {v.field for v in exc.value.field_violations} == {
        "answers[email]",
        "answers[website]",
        "answers[bogus]",
    }
    with pytest.raises(InvalidArgumentError) as exc_nul:
        await submit(admin, form, answers=good_answers(company="Ac\x00me", website="https://acme.test"))
    assert exc_nul.value.reason == "INVALID_TEXT"
    with pytest.raises(InvalidArgumentError) as exc_state:
        await admin.registration.list_registrations(pb.ListRegistrationsRequest(states=[99]))  # type: ignore[list-item]
    assert exc_state.value.reason == "INVALID_STATE_FILTER"
    reg_v2 = await submit(admin, form, answers=good_answers(website="https://acme.test"))
    assert (reg_v1.form_version, reg_v2.form_version) == (1, 2)
    # A hidden field's answer is dropped (vat shows only for distributors).
    reg = await submit(admin, form, answers=good_answers(website="https://acme.test", vat="FR123456"))
    assert "vat" not in reg.answers
    with pytest.raises(InvalidArgumentError) as exc2:
        await admin.registration.create_registration_form(
            pb.CreateRegistrationFormRequest(
                form=pb.RegistrationForm(
                    slug=unique("bad"),
                    name="Bad",
                    steps=[
                        pb.FormStep(
                            key="s",
                            sections=[
                                pb.FormSection(
                                    key="x",
                                    fields=[
                                        pb.FormField(key="pick", type=pb.FIELD_TYPE_SELECT),
                                        pb.FormField(
                                            key="doc", type=pb.FIELD_TYPE_FILE, document_type_code="nope"
                                        ),
                                    ],
                                )
                            ],
                        )
                    ],
                ),
                request_id=rid(),
            )
        )
    assert {
        "form.steps[0].sections[0].fields[0].options",
        "form.steps",
    } <= {v.field for v in exc2.value.field_violations}


async def test_replay_recorded_histories(temporal_env: WorkflowEnvironment) -> None:
    """Workflows run by the tests above (finished and still waiting) replay against the current code."""
    client = temporal_env.client
    histories = [await client.get_workflow_handle(wid).fetch_history() for wid in WORKFLOW_IDS]
    assert len(histories) >= 10

    async def each() -> AsyncIterator[WorkflowHistory]:
        for h in histories:
            yield h

    # One replayer run for all histories: fails on the first nondeterminism.
    results = await Replayer(workflows=WORKFLOWS).replay_workflows(each(), raise_on_replay_failure=True)
    assert not results.replay_failures


async def test_document_type_crud_and_listing(admin: Entrepot, catalog_codes: dict[str, str]) -> None:
    code = unique("kyc")
    created = await admin.registration.create_document_type(
        pb.CreateDocumentTypeRequest(
            document_type=pb.DocumentType(code=code, name="KYC", requires_number=True, active=True),
            request_id=rid(),
        )
    )
    assert list(created.allowed_content_types) == ["application/pdf", "image/png", "image/jpeg"]
    assert created.max_size_bytes == 10 * 1024 * 1024
    updated = await admin.registration.update_document_type(
        pb.UpdateDocumentTypeRequest(
            document_type=pb.DocumentType(code=code, max_size_bytes=2048),
            update_mask={"paths": ["max_size_bytes"]},
            request_id=rid(),
        )
    )
    assert updated.max_size_bytes == 2048 and updated.requires_number and updated.name == "KYC"
    seen: list[str] = []
    token = ""
    while True:
        page = await admin.registration.list_document_types(
            pb.ListDocumentTypesRequest(page_size=1, page_token=token)
        )
        seen += [d.code for d in page.document_types]
        token = page.next_page_token
        if not token:
            break
    assert code in seen and catalog_codes["license"] in seen and len(seen) == len(set(seen))
    # A type with documents cannot be deleted; an unused one can.
    reg = await submit(admin, await make_form(admin))
    await upload_document(admin, reg.id, catalog_codes["license"], "l.pdf", "application/pdf", PDF)
    with pytest.raises(FailedPreconditionError) as exc:
        await admin.registration.delete_document_type(
            pb.DeleteDocumentTypeRequest(code=catalog_codes["license"], request_id=rid())
        )
    assert exc.value.reason == "DOCUMENT_TYPE_IN_USE"
    await admin.registration.delete_document_type(pb.DeleteDocumentTypeRequest(code=code, request_id=rid()))
    with pytest.raises(NotFoundError):
        await admin.registration.get_document_type(pb.GetDocumentTypeRequest(code=code))


async def test_forms_serve_commerce_modes(admin: Entrepot) -> None:
    b2b = await make_form(admin, commerce_mode=pb.COMMERCE_MODE_B2B)
    b2c = await make_form(admin, commerce_mode=pb.COMMERCE_MODE_B2C)
    both = await make_form(admin)
    assert (b2b.commerce_mode, b2c.commerce_mode, both.commerce_mode) == (
        pb.COMMERCE_MODE_B2B,
        pb.COMMERCE_MODE_B2C,
        pb.COMMERCE_MODE_BOTH,
    ), "an unspecified mode is both"
    mine = {b2b.slug, b2c.slug, both.slug}

    async def listed(mode: int) -> set[str]:
        slugs: set[str] = set()
        request = pb.ListRegistrationFormsRequest(page_size=2, commerce_mode=mode)  # type: ignore[arg-type]
        while True:
            page = await admin.registration.list_registration_forms(request)
            slugs |= {f.slug for f in page.forms} & mine
            if not page.next_page_token:
                return slugs
            request.page_token = page.next_page_token

    assert await listed(pb.COMMERCE_MODE_B2B) == {b2b.slug, both.slug}
    assert await listed(pb.COMMERCE_MODE_B2C) == {b2c.slug, both.slug}
    assert await listed(pb.COMMERCE_MODE_BOTH) == {both.slug}
    assert await listed(pb.COMMERCE_MODE_UNSPECIFIED) == mine

    with pytest.raises(FailedPreconditionError) as refused:
        await submit(admin, b2b, commerce_mode=pb.COMMERCE_MODE_B2C)
    assert refused.value.reason == "COMMERCE_MODE_NOT_SERVED"
    with pytest.raises(InvalidArgumentError) as invalid:
        await submit(admin, both, commerce_mode=pb.COMMERCE_MODE_BOTH)
    assert [v.field for v in invalid.value.field_violations] == ["commerce_mode"]
    assert (await submit(admin, both, commerce_mode=pb.COMMERCE_MODE_B2C)).id
    assert (await submit(admin, b2b, commerce_mode=pb.COMMERCE_MODE_B2B)).id

    # The mode is versioned like the other settings: an update may move the form to B2C.
    moved = await admin.registration.update_registration_form(
        pb.UpdateRegistrationFormRequest(
            form=pb.RegistrationForm(id=b2b.id, commerce_mode=pb.COMMERCE_MODE_B2C),
            update_mask={"paths": ["commerce_mode"]},
            request_id=rid(),
        )
    )
    assert moved.commerce_mode == pb.COMMERCE_MODE_B2C and moved.version == 2
    assert await listed(pb.COMMERCE_MODE_B2B) == {both.slug}
