"""Streaming checks for an uploaded document: type and size, while it arrives.

`UploadGuard.feed` is called per chunk; it raises as soon as the content
crosses the document type's size limit or its first bytes contradict the
declared content type, so the caller stops reading the stream at once.
Content is held in memory only up to the limit (at most 50 MiB by the
document type rules) and written in one transaction at the end: a refused
upload leaves nothing anywhere.
"""

from __future__ import annotations

import hashlib

from domain.registration.types import DocumentType
from domain.shared.errors import InvalidArgument, ResourceExhausted

# Leading bytes of the formats we can recognise; a declared type listed here
# must match its signature. Other allowed types are accepted as declared.
MAGIC: dict[str, tuple[bytes, ...]] = {
    "application/pdf": (b"%PDF-",),
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "image/tiff": (b"II*\x00", b"MM\x00*"),
}
SNIFF = 8


class UploadGuard:
    def __init__(self, doc_type: DocumentType, content_type: str, filename: str) -> None:
        meta = {"document_type_code": doc_type.code, "content_type": content_type}
        if not doc_type.active:
            raise InvalidArgument(
                "DOCUMENT_TYPE_INACTIVE", f"document type {doc_type.code!r} is not active", metadata=meta
            )
        ct = content_type.strip().lower()
        if ct not in doc_type.allowed_content_types:
            raise InvalidArgument(
                "DOCUMENT_TYPE_NOT_ALLOWED",
                f"{content_type!r} is not allowed for {doc_type.code!r} "
                f"(allowed: {', '.join(doc_type.allowed_content_types)})",
                metadata=meta,
            )
        if not filename.strip() or len(filename) > 255 or "/" in filename or "\\" in filename:
            raise InvalidArgument("INVALID_FILENAME", "filename must be 1 to 255 characters without slashes")
        self.content_type = ct
        self.limit = doc_type.max_size_bytes
        self._meta = meta
        self._parts: list[bytes] = []
        self._size = 0
        self._hash = hashlib.sha256()
        self._head = b""

    @property
    def size(self) -> int:
        return self._size

    def feed(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self.limit:
            self._parts.clear()  # keep nothing of a refused upload
            raise ResourceExhausted(
                "DOCUMENT_TOO_LARGE",
                f"the document exceeds the limit of {self.limit} bytes for this type",
                metadata={**self._meta, "max_size_bytes": str(self.limit)},
            )
        if len(self._head) < SNIFF:
            self._head += chunk[: SNIFF - len(self._head)]
            self._check_signature(final=False)
        self._hash.update(chunk)
        self._parts.append(chunk)

    def _check_signature(self, *, final: bool) -> None:
        signatures = MAGIC.get(self.content_type)
        if not signatures or any(self._head.startswith(s) for s in signatures):
            return
        # Too few bytes yet to decide: wait unless the stream has ended.
        if not final and any(s.startswith(self._head) for s in signatures):
            return
        self._parts.clear()
        raise InvalidArgument(
            "DOCUMENT_CONTENT_MISMATCH", f"the content is not {self.content_type}", metadata=self._meta
        )

    def finish(self) -> tuple[bytes, str]:
        if self._size == 0:
            raise InvalidArgument("DOCUMENT_EMPTY", "the upload carried no content", metadata=self._meta)
        self._check_signature(final=True)
        return b"".join(self._parts), self._hash.hexdigest()
