"""RegistrationService servicer: thin translation around domain.registration."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC
from typing import Any

import grpc
from sqlalchemy.ext.asyncio import AsyncSession
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from domain.registration import (
    BuiltinESignature,
    DocumentStorage,
    DocumentVerificationInput,
    DocumentVerificationWorkflow,
    ESignatureProvider,
    PostgresDocumentStorage,
    UploadGuard,
    catalog,
    starter,
    submissions,
)
from domain.registration.workflows import REQUIREMENTS_SIGNAL, REVIEW_SIGNAL
from domain.shared.errors import InvalidArgument, Unavailable
from domain.shared.uow import UnitOfWork
from entrepot.registration.v1 import registration_pb2 as pb
from entrepot.registration.v1 import registration_pb2_grpc
from server.client_address import client_ip, parse_networks
from server.context import current_caller, current_channel
from server.convert import from_ts_field
from server.interceptors import check_text
from server.runtime import Runtime
from server.services import registration_convert as cv

log = logging.getLogger("entrepot.registration")
MAX_CHUNK = 1024 * 1024


def metadata_value(context: grpc.aio.ServicerContext[Any, Any], key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("utf-8", "replace")
    return ""


def _temporal_unavailable(exc: RPCError) -> Unavailable:
    # The change is committed; the same call retried with the same request_id
    # returns it again and reaches the workflow then.
    return Unavailable(
        "WORKFLOW_UNAVAILABLE",
        "saved, but the workflow service could not be reached; retry with the same request_id",
        metadata={"temporal_status": exc.status.name},
    )


def mask_paths(request: Any) -> list[str]:
    return list(request.update_mask.paths) if request.HasField("update_mask") else []


class RegistrationServicer(registration_pb2_grpc.RegistrationServiceServicer):
    def __init__(
        self,
        rt: Runtime,
        storage: DocumentStorage | None = None,
        esignature: ESignatureProvider | None = None,
    ) -> None:
        self.rt = rt
        self.storage: DocumentStorage = storage or PostgresDocumentStorage()
        self.esignature: ESignatureProvider = esignature or BuiltinESignature()
        self.trusted_proxies = parse_networks(rt.settings.trusted_proxies)

    # -------------------------------------------------------------- helpers

    async def _mutate(self, request: Any, fn: Callable[[AsyncSession], Awaitable[Any]]) -> Any:
        async def run(uow: UnitOfWork) -> Any:
            return await fn(uow.session)

        return await self.rt.mutate(request, run)

    async def _start(self, workflow: Any, arg: Any, workflow_id: str) -> None:
        """Start a workflow after the commit. The id is derived from the resource, so a
        retried call (same request_id) that finds it running changes nothing, and one
        whose first attempt died between commit and start starts it now."""
        client = await self.rt.temporal()
        try:
            await client.start_workflow(
                workflow, arg, id=workflow_id, task_queue=self.rt.settings.temporal_task_queue
            )
        except WorkflowAlreadyStartedError:
            log.debug("workflow already started", extra={"workflow_id": workflow_id})
        except RPCError as exc:
            raise _temporal_unavailable(exc) from exc

    async def _start_registration_workflow(self, reg: pb.Registration) -> None:
        """After the commit; when Temporal cannot be reached now (or the process dies
        first), the reconciler job (server/background.py, domain/registration/starter.py)
        starts it: the registration is stored, so the answer stands."""
        expires_at = reg.expire_time.ToDatetime(tzinfo=UTC).isoformat()
        queue = self.rt.settings.temporal_task_queue
        await self.rt.start_after_commit(
            lambda client: starter.start_registration(client, queue, reg.id, expires_at),
            registration_id=reg.id,
        )

    async def _signal(self, registration_id: str, signal: str) -> None:
        client = await self.rt.temporal()
        handle = client.get_workflow_handle(submissions.registration_workflow_id(registration_id))
        try:
            await handle.signal(signal)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise _temporal_unavailable(exc) from exc
            # Finished (decided or expired) or not started yet: the workflow reads
            # the database when it (re)starts, so nothing is lost.
            log.info("registration workflow not signalled", extra={"registration_id": registration_id})

    # -------------------------------------------------------------- forms

    async def CreateRegistrationForm(
        self, request: pb.CreateRegistrationFormRequest, context: Any
    ) -> pb.RegistrationForm:
        channel = current_channel().slug
        f = request.form
        steps = [cv.to_json(s) for s in f.steps]
        expire = f.expire_after.seconds if f.HasField("expire_after") else None
        mode = cv.commerce_mode(f.commerce_mode, "form.commerce_mode")

        async def run(s: AsyncSession) -> pb.RegistrationForm:
            form = await catalog.create_form(
                s,
                channel=channel,
                slug=f.slug,
                name=f.name,
                description=f.description,
                customer_group=f.customer_group,
                invitation_required=f.invitation_required,
                steps=steps,
                expire_after_seconds=expire,
                active=f.active,
                commerce_mode=mode,
            )
            return cv.form_to_proto(form)

        return await self._mutate(request, run)  # type: ignore[no-any-return]

    async def UpdateRegistrationForm(
        self, request: pb.UpdateRegistrationFormRequest, context: Any
    ) -> pb.RegistrationForm:
        channel = current_channel().slug
        f = request.form
        steps = [cv.to_json(s) for s in f.steps]
        expire = f.expire_after.seconds if f.HasField("expire_after") else None
        mode = cv.commerce_mode(f.commerce_mode, "form.commerce_mode")

        async def run(s: AsyncSession) -> pb.RegistrationForm:
            form = await catalog.update_form(
                s,
                channel=channel,
                form_id=f.id,
                fields=mask_paths(request),
                name=f.name,
                description=f.description,
                customer_group=f.customer_group,
                invitation_required=f.invitation_required,
                steps=steps,
                expire_after_seconds=expire,
                active=f.active,
                commerce_mode=mode,
            )
            return cv.form_to_proto(form)

        return await self._mutate(request, run)  # type: ignore[no-any-return]

    async def GetRegistrationForm(
        self, request: pb.GetRegistrationFormRequest, context: Any
    ) -> pb.RegistrationForm:
        channel = current_channel().slug
        form = await self.rt.read(
            lambda s: catalog.get_form(
                s, channel=channel, form_id=request.id, slug=request.slug, version=request.version
            )
        )
        return cv.form_to_proto(form)

    async def ListRegistrationForms(
        self, request: pb.ListRegistrationFormsRequest, context: Any
    ) -> pb.ListRegistrationFormsResponse:
        channel = current_channel().slug
        mode = cv.commerce_mode(request.commerce_mode, "commerce_mode")
        forms, token = await self.rt.read(
            lambda s: catalog.list_forms(
                s, channel=channel, size=request.page_size, token=request.page_token, commerce_mode=mode
            )
        )
        return pb.ListRegistrationFormsResponse(
            forms=[cv.form_to_proto(f) for f in forms], next_page_token=token
        )

    # -------------------------------------------------------------- rules

    async def CreateRegistrationRule(
        self, request: pb.CreateRegistrationRuleRequest, context: Any
    ) -> pb.RegistrationRule:
        channel = current_channel().slug
        r = request.rule

        async def run(s: AsyncSession) -> pb.RegistrationRule:
            rec = await catalog.create_rule(
                s,
                channel=channel,
                name=r.name,
                type=cv.enum_str(pb.RegistrationRule.Type, "TYPE_", r.type),
                geo=cv.to_json(r.geo),
                requirements=cv.to_json(r.requirements),
                reason=r.reason,
                priority=r.priority,
                form_id=r.form_id,
                active=r.active,
            )
            return cv.rule_to_proto(rec)

        return await self._mutate(request, run)  # type: ignore[no-any-return]

    async def ListRegistrationRules(
        self, request: pb.ListRegistrationRulesRequest, context: Any
    ) -> pb.ListRegistrationRulesResponse:
        channel = current_channel().slug
        rules, token = await self.rt.read(
            lambda s: catalog.list_rules(
                s, channel=channel, form_id=request.form_id, size=request.page_size, token=request.page_token
            )
        )
        return pb.ListRegistrationRulesResponse(
            rules=[cv.rule_to_proto(r) for r in rules], next_page_token=token
        )

    async def EvaluateRegistrationRules(
        self, request: pb.EvaluateRegistrationRulesRequest, context: Any
    ) -> pb.EvaluateRegistrationRulesResponse:
        channel = current_channel().slug
        address = cv.address_from_proto(request.address)
        ev = await self.rt.read(
            lambda s: catalog.evaluate_rules(s, channel=channel, address=address, form_id=request.form_id)
        )
        return cv.evaluation_to_proto(ev)

    # -------------------------------------------------------------- document types

    async def CreateDocumentType(
        self, request: pb.CreateDocumentTypeRequest, context: Any
    ) -> pb.DocumentType:
        d = request.document_type

        async def run(s: AsyncSession) -> pb.DocumentType:
            dt = await catalog.create_document_type(s, code=d.code, values=cv.document_type_values(d))
            return cv.document_type_to_proto(dt)

        return await self._mutate(request, run)  # type: ignore[no-any-return]

    async def GetDocumentType(self, request: pb.GetDocumentTypeRequest, context: Any) -> pb.DocumentType:
        return cv.document_type_to_proto(
            await self.rt.read(lambda s: catalog.get_document_type(s, request.code))
        )

    async def ListDocumentTypes(
        self, request: pb.ListDocumentTypesRequest, context: Any
    ) -> pb.ListDocumentTypesResponse:
        items, token = await self.rt.read(
            lambda s: catalog.list_document_types(s, size=request.page_size, token=request.page_token)
        )
        return pb.ListDocumentTypesResponse(
            document_types=[cv.document_type_to_proto(d) for d in items], next_page_token=token
        )

    async def UpdateDocumentType(
        self, request: pb.UpdateDocumentTypeRequest, context: Any
    ) -> pb.DocumentType:
        d = request.document_type

        async def run(s: AsyncSession) -> pb.DocumentType:
            dt = await catalog.update_document_type(
                s, code=d.code, fields=mask_paths(request), values=cv.document_type_values(d)
            )
            return cv.document_type_to_proto(dt)

        return await self._mutate(request, run)  # type: ignore[no-any-return]

    async def DeleteDocumentType(
        self, request: pb.DeleteDocumentTypeRequest, context: Any
    ) -> pb.DeleteDocumentTypeResponse:
        async def run(s: AsyncSession) -> pb.DeleteDocumentTypeResponse:
            await catalog.delete_document_type(s, request.code)
            return pb.DeleteDocumentTypeResponse()

        return await self._mutate(request, run)  # type: ignore[no-any-return]

    # -------------------------------------------------------------- agreements

    async def _publish(self, request: Any, create: bool) -> pb.AgreementTemplate:
        a = request.agreement

        async def run(s: AsyncSession) -> pb.AgreementTemplate:
            t = await catalog.publish_agreement(
                s,
                code=a.code,
                title=a.title,
                body=a.body,
                signature_required=a.signature_required,
                create=create,
            )
            return cv.agreement_to_proto(t)

        return await self._mutate(request, run)  # type: ignore[no-any-return]

    async def CreateAgreementTemplate(
        self, request: pb.CreateAgreementTemplateRequest, context: Any
    ) -> pb.AgreementTemplate:
        return await self._publish(request, create=True)

    async def UpdateAgreementTemplate(
        self, request: pb.UpdateAgreementTemplateRequest, context: Any
    ) -> pb.AgreementTemplate:
        return await self._publish(request, create=False)

    async def GetAgreementTemplate(
        self, request: pb.GetAgreementTemplateRequest, context: Any
    ) -> pb.AgreementTemplate:
        return cv.agreement_to_proto(
            await self.rt.read(lambda s: catalog.get_agreement(s, request.code, request.version))
        )

    async def ListAgreementTemplates(
        self, request: pb.ListAgreementTemplatesRequest, context: Any
    ) -> pb.ListAgreementTemplatesResponse:
        items, token = await self.rt.read(
            lambda s: catalog.list_agreements(s, size=request.page_size, token=request.page_token)
        )
        return pb.ListAgreementTemplatesResponse(
            agreements=[cv.agreement_to_proto(a) for a in items], next_page_token=token
        )

    # -------------------------------------------------------------- invitation codes

    async def CreateInvitationCode(
        self, request: pb.CreateInvitationCodeRequest, context: Any
    ) -> pb.InvitationCode:
        channel = current_channel().slug
        c = request.invitation_code

        async def run(s: AsyncSession) -> pb.InvitationCode:
            ic = await catalog.create_invitation_code(
                s,
                channel=channel,
                code=c.code,
                form_id=c.form_id,
                customer_group=c.customer_group,
                max_uses=c.max_uses,
                expires_at=from_ts_field(c, "expire_time", "invitation_code.expire_time"),
                active=c.active,
            )
            return cv.invitation_to_proto(ic)

        return await self._mutate(request, run)  # type: ignore[no-any-return]

    async def GetInvitationCode(
        self, request: pb.GetInvitationCodeRequest, context: Any
    ) -> pb.InvitationCode:
        channel = current_channel().slug
        ic = await self.rt.read(lambda s: catalog.get_invitation_code(s, channel=channel, code=request.code))
        return cv.invitation_to_proto(ic)

    async def ListInvitationCodes(
        self, request: pb.ListInvitationCodesRequest, context: Any
    ) -> pb.ListInvitationCodesResponse:
        channel = current_channel().slug
        items, token = await self.rt.read(
            lambda s: catalog.list_invitation_codes(
                s, channel=channel, size=request.page_size, token=request.page_token
            )
        )
        return pb.ListInvitationCodesResponse(
            invitation_codes=[cv.invitation_to_proto(c) for c in items], next_page_token=token
        )

    # -------------------------------------------------------------- registrations

    async def SubmitRegistration(
        self, request: pb.SubmitRegistrationRequest, context: Any
    ) -> pb.Registration:
        channel = current_channel().slug
        caller = current_caller()
        answers = {k: cv.answer_from_proto(k, v) for k, v in request.answers.items()}
        address = cv.address_from_proto(request.address)
        mode = cv.commerce_mode(request.commerce_mode, "commerce_mode", registering=True)

        async def run(s: AsyncSession) -> pb.Registration:
            reg = await submissions.submit(
                s,
                channel=channel,
                caller=caller,
                form_ref=request.form,
                answers=answers,
                address=address,
                invitation_code=request.invitation_code,
                commerce_mode=mode,
            )
            return cv.registration_to_proto(reg)

        result: pb.Registration = await self._mutate(request, run)
        await self._start_registration_workflow(result)
        return result

    async def UploadRegistrationDocument(
        self, request_iterator: AsyncIterator[pb.UploadRegistrationDocumentRequest], context: Any
    ) -> pb.RegistrationDocument:
        channel = current_channel().slug
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument(
                "UPLOAD_HEADER_REQUIRED", "the first message of an upload must be the header"
            )
        h = first.header
        check_text(h, "header.")  # the text stage checks unary requests; a stream checks its own
        if not h.request_id:
            raise InvalidArgument("REQUEST_ID_REQUIRED", "header.request_id is required")
        await self.rt.read(
            lambda s: submissions.check_upload_target(s, channel=channel, registration_id=h.registration_id)
        )
        doc_type = await self.rt.read(lambda s: catalog.get_document_type(s, h.document_type_code))
        guard = UploadGuard(doc_type, h.content_type, h.filename)
        async for message in request_iterator:
            if message.WhichOneof("payload") != "chunk":
                raise InvalidArgument("UPLOAD_HEADER_REPEATED", "only the first message may be a header")
            if len(message.chunk) > MAX_CHUNK:
                raise InvalidArgument("UPLOAD_CHUNK_TOO_LARGE", f"chunks are at most {MAX_CHUNK} bytes")
            guard.feed(message.chunk)  # raises, and the stream is left unread, once over the limit
        content, sha256 = guard.finish()
        # The idempotency key covers the header plus the content hash: the same
        # upload retried returns the first document; other content under the
        # same request_id is REQUEST_ID_REUSED.
        fingerprint = pb.UploadRegistrationDocumentRequest.Header()
        fingerprint.CopyFrom(h)
        fingerprint.filename = f"{h.filename}#sha256={sha256}"

        async def run(s: AsyncSession) -> pb.RegistrationDocument:
            doc = await submissions.store_document(
                s,
                self.storage,
                channel=channel,
                registration_id=h.registration_id,
                document_type_code=h.document_type_code,
                filename=h.filename,
                content_type=guard.content_type,
                content=content,
                sha256=sha256,
                number=h.number,
                issuing_authority=h.issuing_authority,
                expiration_date=h.expiration_date,
            )
            return cv.document_to_proto(doc)

        result: pb.RegistrationDocument = await self._mutate(fingerprint, run)
        await self._start(
            DocumentVerificationWorkflow.run,
            DocumentVerificationInput(result.id, result.registration_id),
            submissions.verification_workflow_id(result.id),
        )
        await self._signal(result.registration_id, REQUIREMENTS_SIGNAL)
        return result

    async def SignAgreement(self, request: pb.SignAgreementRequest, context: Any) -> pb.AgreementSignature:
        channel = current_channel().slug
        ip = client_ip(context, self.trusted_proxies)
        user_agent = metadata_value(context, "user-agent")

        async def run(s: AsyncSession) -> pb.AgreementSignature:
            sig = await submissions.sign_agreement(
                s,
                self.esignature,
                channel=channel,
                registration_id=request.registration_id,
                agreement_code=request.agreement_code,
                agreement_version=request.agreement_version,
                method=cv.enum_str(pb.SignatureMethod, "SIGNATURE_METHOD_", request.method),
                signer_name=request.signer_name,
                signer_email=request.signer_email,
                signature=request.signature,
                external_reference=request.external_reference,
                ip_address=ip,
                user_agent=user_agent,
            )
            return cv.signature_to_proto(sig)

        result: pb.AgreementSignature = await self._mutate(request, run)
        await self._signal(result.registration_id, REQUIREMENTS_SIGNAL)
        return result

    async def ReviewRegistration(
        self, request: pb.ReviewRegistrationRequest, context: Any
    ) -> pb.Registration:
        channel = current_channel().slug
        caller = current_caller()

        async def run(s: AsyncSession) -> pb.Registration:
            reg = await submissions.review(
                s,
                channel=channel,
                caller=caller,
                registration_id=request.registration_id,
                decision=cv.enum_str(pb.Registration.Decision, "DECISION_", request.decision),
                note=request.note,
            )
            return cv.registration_to_proto(reg)

        result: pb.Registration = await self._mutate(request, run)
        # After the commit; a retry with the same request_id signals again (harmless).
        await self._signal(result.id, REVIEW_SIGNAL)
        return result

    async def GetRegistration(self, request: pb.GetRegistrationRequest, context: Any) -> pb.Registration:
        channel = current_channel().slug
        reg = await self.rt.read(
            lambda s: submissions.get_registration(s, channel=channel, registration_id=request.id)
        )
        return cv.registration_to_proto(reg)

    async def ListRegistrations(
        self, request: pb.ListRegistrationsRequest, context: Any
    ) -> pb.ListRegistrationsResponse:
        channel = current_channel().slug
        states = [cv.state_from_proto(s) for s in request.states]
        regs, token = await self.rt.read(
            lambda s: submissions.list_registrations(
                s,
                channel=channel,
                states=states,
                form_id=request.form_id,
                size=request.page_size,
                token=request.page_token,
            )
        )
        return pb.ListRegistrationsResponse(
            registrations=[cv.registration_to_proto(r) for r in regs], next_page_token=token
        )
