"""Input rules shared by every inventory entry point (pure, unit tested)."""

from __future__ import annotations

import math
import re
import unicodedata

from domain.inventory.types import GeoPoint
from domain.shared.errors import Violations

MAX_SKU = 128
WAREHOUSE_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_TEXT = 1000
MAX_QUANTITY = 1_000_000_000_000  # far above any real stock, far below int64 overflow
MAX_LEVEL = 1_000_000_000_000_000  # on_hand ceiling: sums and costs stay inside int64
MAX_MINOR = 2**63 - 1


def normalize_sku(raw: str) -> str | None:
    """NFC-normalised SKU, or None when it is not 1..128 printable characters."""
    sku = unicodedata.normalize("NFC", raw)
    if not 1 <= len(sku) <= MAX_SKU or not sku.isprintable() or sku != sku.strip():
        return None
    return sku


def check_sku(v: Violations, field_path: str, raw: str) -> str:
    sku = normalize_sku(raw)
    if sku is None:
        v.add(field_path, "must be 1 to 128 printable characters without leading or trailing spaces")
        return raw
    return sku


def sku_or_raise(raw: str, field_path: str = "sku") -> str:
    v = Violations()
    sku = check_sku(v, field_path, raw)
    v.raise_if_any("the SKU is invalid")
    return sku


def check_warehouse_code(v: Violations, field_path: str, code: str, *, required: bool = True) -> None:
    if not code and not required:
        return
    if not WAREHOUSE_CODE.match(code):
        v.add(field_path, "must match [A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_quantity(v: Violations, field_path: str, q: int, *, minimum: int = 1) -> None:
    if q < minimum or q > MAX_QUANTITY:
        v.add(field_path, f"must be between {minimum} and {MAX_QUANTITY}")


def check_text(v: Violations, field_path: str, value: str, limit: int = MAX_TEXT) -> None:
    if len(value) > limit:
        v.add(field_path, f"must be at most {limit} characters")
    elif "\x00" in value:
        # PostgreSQL text cannot hold NUL; refuse it here rather than fail in SQL.
        v.add(field_path, "must not contain NUL characters")


def filters_or_raise(**fields: str) -> None:
    """Free-text filters of list/get calls: bounded and NUL-free."""
    v = Violations()
    for name, value in fields.items():
        check_text(v, name, value, 256)
    v.raise_if_any("the request is invalid")


def check_geo_point(v: Violations, field_path: str, point: GeoPoint) -> None:
    if not (math.isfinite(point.latitude) and -90 <= point.latitude <= 90):
        v.add(field_path + ".latitude", "must be between -90 and 90")
    if not (math.isfinite(point.longitude) and -180 <= point.longitude <= 180):
        v.add(field_path + ".longitude", "must be between -180 and 180")
