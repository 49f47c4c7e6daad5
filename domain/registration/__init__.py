"""Registration: B2B onboarding (forms, geo rules, documents, agreements,
invitation codes, and the durable registration lifecycle).

The public interface of the module; other modules and the servicer import
from here only.
"""

from domain.registration import catalog, forms, rules, starter, submissions
from domain.registration.activities import RegistrationActivities
from domain.registration.storage import DocumentStorage, PostgresDocumentStorage
from domain.registration.strategies import (
    BuiltinESignature,
    ESignatureProvider,
    ManualReview,
    NoOcr,
    OcrStrategy,
    VerificationStrategy,
)
from domain.registration.uploads import UploadGuard
from domain.registration.workflows import (
    DocumentVerificationInput,
    DocumentVerificationWorkflow,
    RegistrationInput,
    RegistrationWorkflow,
)

WORKFLOWS = [RegistrationWorkflow, DocumentVerificationWorkflow]

__all__ = [
    "WORKFLOWS",
    "BuiltinESignature",
    "DocumentStorage",
    "DocumentVerificationInput",
    "DocumentVerificationWorkflow",
    "ESignatureProvider",
    "ManualReview",
    "NoOcr",
    "OcrStrategy",
    "PostgresDocumentStorage",
    "RegistrationActivities",
    "RegistrationInput",
    "RegistrationWorkflow",
    "UploadGuard",
    "VerificationStrategy",
    "catalog",
    "forms",
    "rules",
    "starter",
    "submissions",
]
