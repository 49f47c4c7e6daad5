"""Registration forms: steps > sections > fields, visibility and validation.

Pure code (no database): a form definition is parsed from its canonical JSON
(the proto's JSON mapping with proto field names, which is also how it is
stored), checked once when saved (`check_definition`), and applied to the
answers of a submission (`validate_answers`).

Visibility: a step, a section or a field may carry `visible_when`. A
condition may only refer to fields that come earlier in the form, so one pass
in form order decides everything and no cycle is possible. A hidden field's
answer is ignored and counts as "not set" for later conditions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from domain.shared.errors import Violations

KEY = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


class FieldType(StrEnum):
    TEXT = "text"
    TEXTAREA = "textarea"
    EMAIL = "email"
    PHONE = "phone"
    NUMBER = "number"
    DECIMAL = "decimal"
    DATE = "date"
    SELECT = "select"
    MULTI_SELECT = "multi_select"
    RADIO = "radio"
    CHECKBOX = "checkbox"
    COUNTRY = "country"
    STATE = "state"
    POSTAL_CODE = "postal_code"
    ADDRESS = "address"
    TAX_ID = "tax_id"
    URL = "url"
    FILE = "file"
    SIGNATURE = "signature"
    AGREEMENT = "agreement"
    DATETIME = "datetime"
    HIDDEN = "hidden"
    COMPANY_NUMBER = "company_number"


# Fields satisfied by another call (upload, signature), never by an answer.
NON_ANSWER_TYPES = frozenset({FieldType.FILE, FieldType.SIGNATURE})
CHOICE_TYPES = frozenset({FieldType.SELECT, FieldType.RADIO, FieldType.MULTI_SELECT})
MAPPING_TARGETS = frozenset({"account", "address", "meta", "document"})

# An answer: text (also numbers, decimals, dates), choices, a flag or an address.
Answer = str | list[str] | bool | dict[str, str]


def enum_name(value: Any, prefix: str) -> str:
    """'FIELD_TYPE_TEXT' or 'text' -> 'text' (the JSON mapping uses enum names)."""
    s = str(value or "")
    if s.upper().startswith(prefix):
        s = s[len(prefix) :]
    return s.lower()


@dataclass(frozen=True)
class Clause:
    field_key: str
    operator: str  # equals, not_equals, in, not_in, is_set, is_not_set
    values: tuple[str, ...]


@dataclass(frozen=True)
class Condition:
    match_any: bool = False
    clauses: tuple[Clause, ...] = ()

    def holds(self, answers: Mapping[str, Answer]) -> bool:
        if not self.clauses:
            return True
        results = (_clause_holds(c, answers) for c in self.clauses)
        return any(results) if self.match_any else all(results)


def answer_strings(value: Answer | None) -> list[str]:
    """The values a condition compares with; empty means "not set"."""
    if value is None:
        return []
    if isinstance(value, bool):
        return ["true"] if value else []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list):
        return [v for v in value if v]
    country = value.get("country_code", "")
    return [country] if any(value.values()) else []


def _clause_holds(c: Clause, answers: Mapping[str, Answer]) -> bool:
    got = answer_strings(answers.get(c.field_key))
    if c.operator == "is_set":
        return bool(got)
    if c.operator == "is_not_set":
        return not got
    hit = any(g in c.values for g in got)
    if c.operator in ("equals", "in"):
        return hit
    return not hit  # not_equals, not_in


@dataclass(frozen=True)
class Validation:
    pattern: str = ""
    min_length: int | None = None
    max_length: int | None = None
    min_value: str = ""
    max_value: str = ""
    allowed_values: tuple[str, ...] = ()
    min_items: int | None = None
    max_items: int | None = None


@dataclass(frozen=True)
class FormField:
    key: str
    label: str
    type: FieldType
    required: bool = False
    options: tuple[str, ...] = ()
    validation: Validation = field(default_factory=Validation)
    visible_when: Condition = field(default_factory=Condition)
    maps_to_target: str = ""
    maps_to_path: str = ""
    document_type_code: str = ""
    agreement_code: str = ""


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    visible_when: Condition
    fields: tuple[FormField, ...]


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    visible_when: Condition
    sections: tuple[Section, ...]


@dataclass(frozen=True)
class FormDefinition:
    steps: tuple[Step, ...]

    def fields(self) -> list[tuple[Step, Section, FormField]]:
        return [(st, se, f) for st in self.steps for se in st.sections for f in se.fields]

    def field(self, key: str) -> FormField | None:
        for _, _, f in self.fields():
            if f.key == key:
                return f
        return None


# ------------------------------------------------------------------ parsing


def _condition(raw: Mapping[str, Any] | None) -> Condition:
    raw = raw or {}
    clauses = tuple(
        Clause(
            field_key=str(c.get("field_key", "")),
            operator=enum_name(c.get("operator"), "OPERATOR_"),
            values=tuple(str(v) for v in c.get("values", [])),
        )
        for c in raw.get("clauses", [])
    )
    return Condition(match_any=enum_name(raw.get("match"), "MATCH_") == "any", clauses=clauses)


def _opt_int(raw: Mapping[str, Any], key: str) -> int | None:
    return int(raw[key]) if key in raw and raw[key] is not None else None


def _validation(raw: Mapping[str, Any] | None) -> Validation:
    raw = raw or {}
    return Validation(
        pattern=str(raw.get("pattern", "")),
        min_length=_opt_int(raw, "min_length"),
        max_length=_opt_int(raw, "max_length"),
        min_value=str(raw.get("min_value", "")),
        max_value=str(raw.get("max_value", "")),
        allowed_values=tuple(str(v) for v in raw.get("allowed_values", [])),
        min_items=_opt_int(raw, "min_items"),
        max_items=_opt_int(raw, "max_items"),
    )


def _field_type(raw: Any) -> FieldType | None:
    try:
        return FieldType(enum_name(raw, "FIELD_TYPE_"))
    except ValueError:
        return None


def parse_definition(steps: Sequence[Mapping[str, Any]]) -> tuple[FormDefinition, Violations]:
    """Parse the `steps` JSON; structural problems are reported as violations."""
    v = Violations()
    out_steps: list[Step] = []
    for i, st in enumerate(steps):
        sections: list[Section] = []
        for j, se in enumerate(st.get("sections", [])):
            fields: list[FormField] = []
            for k, f in enumerate(se.get("fields", [])):
                path = f"form.steps[{i}].sections[{j}].fields[{k}]"
                ftype = _field_type(f.get("type"))
                if ftype is None:
                    v.add(path + ".type", f"{f.get('type')!r} is not a field type")
                    continue
                maps = f.get("maps_to") or {}
                fields.append(
                    FormField(
                        key=str(f.get("key", "")),
                        label=str(f.get("label", "")),
                        type=ftype,
                        required=bool(f.get("required", False)),
                        options=tuple(str(o.get("value", "")) for o in f.get("options", [])),
                        validation=_validation(f.get("validation")),
                        visible_when=_condition(f.get("visible_when")),
                        maps_to_target=enum_name(maps.get("target"), "TARGET_") if maps else "",
                        maps_to_path=str(maps.get("path", "")),
                        document_type_code=str(f.get("document_type_code", "")),
                        agreement_code=str(f.get("agreement_code", "")),
                    )
                )
            sections.append(
                Section(
                    str(se.get("key", "")),
                    str(se.get("title", "")),
                    _condition(se.get("visible_when")),
                    tuple(fields),
                )
            )
        out_steps.append(
            Step(
                str(st.get("key", "")),
                str(st.get("title", "")),
                _condition(st.get("visible_when")),
                tuple(sections),
            )
        )
    return FormDefinition(tuple(out_steps)), v


def check_definition(form: FormDefinition, v: Violations) -> None:
    """Rules a form must follow to be saved (added to `v`)."""
    if not form.fields():
        v.add("form.steps", "a form needs at least one field")
    seen: set[str] = set()

    def check_condition(cond: Condition, path: str) -> None:
        for n, c in enumerate(cond.clauses):
            if c.field_key not in seen:
                v.add(f"{path}.clauses[{n}].field_key", f"{c.field_key!r} must be a field that comes earlier")
            if c.operator not in ("equals", "not_equals", "in", "not_in", "is_set", "is_not_set"):
                v.add(f"{path}.clauses[{n}].operator", "is required")
            elif c.operator in ("equals", "not_equals", "in", "not_in") and not c.values:
                v.add(f"{path}.clauses[{n}].values", f"{c.operator} needs at least one value")

    step_keys: set[str] = set()
    for i, st in enumerate(form.steps):
        sp = f"form.steps[{i}]"
        if not KEY.match(st.key) or st.key in step_keys:
            v.add(sp + ".key", "must be a unique key matching [a-z][a-z0-9_]{0,62}")
        step_keys.add(st.key)
        check_condition(st.visible_when, sp + ".visible_when")
        for j, se in enumerate(st.sections):
            ep = f"{sp}.sections[{j}]"
            check_condition(se.visible_when, ep + ".visible_when")
            for k, f in enumerate(se.fields):
                fp = f"{ep}.fields[{k}]"
                if not KEY.match(f.key):
                    v.add(fp + ".key", "must match [a-z][a-z0-9_]{0,62}")
                elif f.key in seen:
                    v.add(fp + ".key", f"{f.key!r} is used twice")
                check_condition(f.visible_when, fp + ".visible_when")
                _check_field(f, fp, v)
                seen.add(f.key)


def _check_field(f: FormField, fp: str, v: Violations) -> None:
    if f.type in CHOICE_TYPES and not f.options:
        v.add(fp + ".options", f"a {f.type.value} field needs options")
    if len(set(f.options)) != len(f.options):
        v.add(fp + ".options", "option values must be unique")
    if f.type == FieldType.FILE and not f.document_type_code:
        v.add(fp + ".document_type_code", "a file field names its document type")
    if f.type in (FieldType.SIGNATURE, FieldType.AGREEMENT) and not f.agreement_code:
        v.add(fp + ".agreement_code", f"a {f.type.value} field names its agreement")
    if f.maps_to_target and f.maps_to_target not in MAPPING_TARGETS:
        v.add(fp + ".maps_to.target", "must be account, address, meta or document")
    if f.maps_to_target in ("account", "meta") and not f.maps_to_path:
        v.add(fp + ".maps_to.path", "is required for account and meta mappings")
    val = f.validation
    if val.pattern:
        try:
            re.compile(val.pattern)
        except re.error as exc:
            v.add(fp + ".validation.pattern", f"is not a valid regular expression: {exc}")
    for name, bound in (("min_value", val.min_value), ("max_value", val.max_value)):
        if bound and _decimal(bound) is None:
            v.add(f"{fp}.validation.{name}", "must be a decimal number")
    if val.min_length is not None and val.max_length is not None and val.min_length > val.max_length:
        v.add(fp + ".validation", "min_length is greater than max_length")


# ------------------------------------------------------------------ answers

EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
PHONE = re.compile(r"^\+?[0-9 ().-]{5,24}$")
INTEGER = re.compile(r"^-?\d+$")
DECIMAL = re.compile(r"^-?\d+(\.\d+)?$")
COUNTRY = re.compile(r"^[A-Z]{2}$")
POSTAL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 -]{1,11}$")
TAX_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 .-]{3,31}$")


def _decimal(s: str) -> Decimal | None:
    if not DECIMAL.match(s.strip()):
        return None
    try:
        return Decimal(s.strip())
    except InvalidOperation:
        return None


def is_present(value: Answer | None) -> bool:
    return bool(answer_strings(value))


def visible_fields(form: FormDefinition, answers: Mapping[str, Answer]) -> list[FormField]:
    """Fields shown for these answers, in form order (one pass; see module doc)."""
    effective: dict[str, Answer] = {}
    shown: list[FormField] = []
    for st in form.steps:
        st_visible = st.visible_when.holds(effective)
        for se in st.sections:
            se_visible = st_visible and se.visible_when.holds(effective)
            for f in se.fields:
                if se_visible and f.visible_when.holds(effective):
                    shown.append(f)
                    if f.key in answers:
                        effective[f.key] = answers[f.key]
    return shown


def validate_answers(
    form: FormDefinition, answers: Mapping[str, Answer]
) -> tuple[dict[str, Answer], Violations]:
    """Returns the answers kept (visible fields only) and every violation found."""
    v = Violations()
    known = {f.key for _, _, f in form.fields()}
    for key in sorted(set(answers) - known):
        v.add(f"answers[{key}]", "is not a field of this form")
    kept: dict[str, Answer] = {}
    for f in visible_fields(form, answers):
        path = f"answers[{f.key}]"
        value = answers.get(f.key)
        if f.type in NON_ANSWER_TYPES:
            if value is not None:
                v.add(path, f"a {f.type.value} field is satisfied by an upload or a signature, not an answer")
            continue
        if not is_present(value):
            if f.required:
                v.add(path, "is required")
            elif f.type == FieldType.CHECKBOX and isinstance(value, bool):
                kept[f.key] = value
            continue
        assert value is not None
        error = check_value(f, value)
        if error:
            v.add(path, error)
        else:
            kept[f.key] = value
    return kept, v


def check_value(f: FormField, value: Answer) -> str | None:
    """One answer against its field: None when valid, else what is wrong."""
    t = f.type
    if t in (FieldType.CHECKBOX, FieldType.AGREEMENT):
        if not isinstance(value, bool):
            return "must be true or false"
        if t == FieldType.AGREEMENT and f.required and not value:
            return "the agreement must be accepted"
        return None
    if t == FieldType.MULTI_SELECT:
        if not isinstance(value, list):
            return "must be a list of choices"
        bad = [c for c in value if c not in f.options]
        if bad:
            return f"{bad[0]!r} is not one of the options"
        if len(set(value)) != len(value):
            return "a choice is repeated"
        val = f.validation
        if val.min_items is not None and len(value) < val.min_items:
            return f"choose at least {val.min_items}"
        if val.max_items is not None and len(value) > val.max_items:
            return f"choose at most {val.max_items}"
        return None
    if t == FieldType.ADDRESS:
        if not isinstance(value, dict):
            return "must be an address"
        if not value.get("line1") or not value.get("city"):
            return "an address needs line1 and city"
        if not COUNTRY.match(value.get("country_code", "")):
            return "country_code must be ISO-3166-1 alpha-2 (e.g. 'FR')"
        return None
    if not isinstance(value, str):
        return "must be text"
    return _check_text(f, value.strip())


def _check_text(f: FormField, s: str) -> str | None:
    t, val = f.type, f.validation
    if t == FieldType.EMAIL and not EMAIL.match(s):
        return "is not an email address"
    if t == FieldType.PHONE and (not PHONE.match(s) or sum(ch.isdigit() for ch in s) < 5):
        return "is not a phone number"
    if t == FieldType.NUMBER and not INTEGER.match(s):
        return "must be a whole number"
    if t == FieldType.DECIMAL and _decimal(s) is None:
        return "must be a decimal number like 12.50"
    if t in (FieldType.NUMBER, FieldType.DECIMAL):
        n = _decimal(s)
        assert n is not None
        if val.min_value and n < Decimal(val.min_value):
            return f"must be at least {val.min_value}"
        if val.max_value and n > Decimal(val.max_value):
            return f"must be at most {val.max_value}"
    if t == FieldType.DATE:
        try:
            date.fromisoformat(s)
        except ValueError:
            return "must be a date YYYY-MM-DD"
    if t == FieldType.DATETIME:
        try:
            datetime.fromisoformat(s)
        except ValueError:
            return "must be a date-time YYYY-MM-DDTHH:MM:SS"
    if t in (FieldType.SELECT, FieldType.RADIO) and s not in f.options:
        return f"{s!r} is not one of the options"
    if t == FieldType.COUNTRY and not COUNTRY.match(s):
        return "must be an ISO-3166-1 alpha-2 code like 'FR'"
    if t == FieldType.POSTAL_CODE and not POSTAL.match(s):
        return "is not a postal code"
    if t == FieldType.TAX_ID and not TAX_ID.match(s):
        return "is not a tax id"
    if t == FieldType.URL:
        parts = urlsplit(s)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return "must be an http(s) URL"
    if val.min_length is not None and len(s) < val.min_length:
        return f"must be at least {val.min_length} characters"
    if val.max_length is not None and len(s) > val.max_length:
        return f"must be at most {val.max_length} characters"
    if val.pattern and not re.fullmatch(val.pattern, s):
        return "does not match the expected format"
    if val.allowed_values and s not in val.allowed_values:
        return "is not an allowed value"
    return None


def required_uploads(form: FormDefinition, answers: Mapping[str, Answer]) -> tuple[list[str], list[str]]:
    """Document type codes and agreement codes demanded by required visible FILE / SIGNATURE fields."""
    docs: list[str] = []
    agreements: list[str] = []
    for f in visible_fields(form, answers):
        if not f.required:
            continue
        if f.type == FieldType.FILE and f.document_type_code not in docs:
            docs.append(f.document_type_code)
        if f.type == FieldType.SIGNATURE and f.agreement_code not in agreements:
            agreements.append(f.agreement_code)
    return docs, agreements


def mapped_values(form: FormDefinition, answers: Mapping[str, Answer]) -> dict[str, dict[str, Answer]]:
    """Answers grouped by `maps_to` target: {"account": {...}, "address": {...}, "meta": {...}, "document": {...}}."""
    out: dict[str, dict[str, Answer]] = {t: {} for t in MAPPING_TARGETS}
    for _, _, f in form.fields():
        if f.key in answers and f.maps_to_target:
            out[f.maps_to_target][f.maps_to_path or f.key] = answers[f.key]
    return out
