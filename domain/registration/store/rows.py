"""Decoding of column values read through text()."""

from __future__ import annotations

import json
from typing import Any


def js(value: Any) -> Any:
    """jsonb read through text(): asyncpg may hand back the JSON text."""
    return json.loads(value) if isinstance(value, str) else value
