"""Opaque, tamper-evident page tokens for keyset pagination (AIP-158)."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from domain.shared.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


def page_size(requested: int, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    if requested < 0:
        raise InvalidArgument("INVALID_PAGE_SIZE", "page_size must not be negative")
    if requested == 0:
        return default
    return min(requested, maximum)


def _fingerprint(filters: Any) -> str:
    return hashlib.sha256(json.dumps(filters, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_token(last_key: Any, filters: Any) -> str:
    raw = json.dumps({"k": last_key, "f": _fingerprint(filters)}, default=str).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, filters: Any) -> Any:
    """Returns the last key of the previous page, or None for the first page."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        key, fingerprint = data["k"], data["f"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument("INVALID_PAGE_TOKEN", "page_token is not a token this service issued") from exc
    if fingerprint != _fingerprint(filters):
        raise InvalidArgument("INVALID_PAGE_TOKEN", "page_token was issued for different filters")
    return key
