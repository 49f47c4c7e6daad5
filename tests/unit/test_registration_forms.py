"""Form definitions: structure checks, visibility and answer validation."""

from __future__ import annotations

from typing import Any

import pytest

from domain.registration.catalog import DocumentType
from domain.registration.forms import (
    FieldType,
    FormField,
    Validation,
    check_definition,
    check_value,
    mapped_values,
    parse_definition,
    required_uploads,
    validate_answers,
    visible_fields,
)
from domain.registration.uploads import UploadGuard
from domain.shared.errors import InvalidArgument, ResourceExhausted

STEPS: list[dict[str, Any]] = [
    {
        "key": "company",
        "title": "Company",
        "sections": [
            {
                "key": "basics",
                "fields": [
                    {
                        "key": "company_name",
                        "type": "FIELD_TYPE_TEXT",
                        "required": True,
                        "maps_to": {"target": "TARGET_ACCOUNT", "path": "company_name"},
                    },
                    {
                        "key": "kind",
                        "type": "FIELD_TYPE_SELECT",
                        "required": True,
                        "options": [{"value": "retailer"}, {"value": "distributor"}],
                    },
                    {
                        "key": "vat",
                        "type": "FIELD_TYPE_TAX_ID",
                        "required": True,
                        "visible_when": {
                            "clauses": [
                                {
                                    "field_key": "kind",
                                    "operator": "OPERATOR_EQUALS",
                                    "values": ["distributor"],
                                }
                            ]
                        },
                    },
                    {
                        "key": "employees",
                        "type": "FIELD_TYPE_NUMBER",
                        "validation": {"min_value": "1", "max_value": "1000"},
                    },
                    {
                        "key": "email",
                        "type": "FIELD_TYPE_EMAIL",
                        "required": True,
                        "maps_to": {"target": "TARGET_ACCOUNT", "path": "email"},
                    },
                ],
            }
        ],
    },
    {
        "key": "extra",
        "visible_when": {
            "clauses": [{"field_key": "kind", "operator": "OPERATOR_EQUALS", "values": ["distributor"]}]
        },
        "sections": [
            {
                "key": "docs",
                "fields": [
                    {
                        "key": "license",
                        "type": "FIELD_TYPE_FILE",
                        "required": True,
                        "document_type_code": "license",
                    },
                    {
                        "key": "depot_code",
                        "type": "FIELD_TYPE_TEXT",
                        "required": True,
                        "visible_when": {"clauses": [{"field_key": "vat", "operator": "OPERATOR_IS_SET"}]},
                        "validation": {"pattern": "D-[0-9]{3}"},
                    },
                ],
            }
        ],
    },
]


def definition() -> Any:
    form, v = parse_definition(STEPS)
    check_definition(form, v)
    assert not v, v.items
    return form


def test_at_least_18_field_types() -> None:
    assert len(FieldType) >= 18


def test_visibility_hides_fields_and_hidden_answers_are_ignored() -> None:
    form = definition()
    keys = [f.key for f in visible_fields(form, {"kind": "retailer"})]
    assert keys == ["company_name", "kind", "employees", "email"]
    keys = [f.key for f in visible_fields(form, {"kind": "distributor", "vat": "FR123456789"})]
    assert "vat" in keys and "license" in keys and "depot_code" in keys
    # vat is hidden for a retailer, so its answer is dropped and depot_code stays hidden.
    kept, v = validate_answers(
        form, {"company_name": "Acme", "kind": "retailer", "email": "a@acme.test", "vat": "not checked"}
    )
    assert not v and "vat" not in kept


def test_required_visible_fields_are_enforced_and_all_violations_reported() -> None:
    form = definition()
    _, v = validate_answers(form, {"kind": "distributor", "email": "nope", "employees": "5000", "bogus": "x"})
    fields = {x.field for x in v.items}
    assert fields == {
        "answers[bogus]",
        "answers[company_name]",
        "answers[vat]",
        "answers[email]",
        "answers[employees]",
    }


def test_pattern_on_a_field_shown_by_a_chain_of_conditions() -> None:
    form = definition()
    base = {"company_name": "Acme", "kind": "distributor", "vat": "FR123456789", "email": "a@acme.test"}
    _, v = validate_answers(form, {**base, "depot_code": "X-1"})
    assert [x.field for x in v.items] == ["answers[depot_code]"]
    kept, v = validate_answers(form, {**base, "depot_code": "D-123"})
    assert not v
    assert required_uploads(form, kept) == (["license"], [])
    assert mapped_values(form, kept)["account"] == {"company_name": "Acme", "email": "a@acme.test"}


def test_file_fields_take_no_answer() -> None:
    form = definition()
    _, v = validate_answers(
        form,
        {
            "company_name": "A",
            "kind": "distributor",
            "vat": "FR1234",
            "email": "a@b.co",
            "depot_code": "D-001",
            "license": "x",
        },
    )
    assert [x.field for x in v.items] == ["answers[license]"]


@pytest.mark.parametrize(
    ("ftype", "good", "bad"),
    [
        (FieldType.EMAIL, "a@b.co", "a@b"),
        (FieldType.PHONE, "+33 1 23 45 67 89", "call me"),
        (FieldType.NUMBER, "42", "4.2"),
        (FieldType.DECIMAL, "12.50", "12,50"),
        (FieldType.DATE, "2026-02-28", "2026-02-30"),
        (FieldType.DATETIME, "2026-02-28T10:00:00+01:00", "tomorrow"),
        (FieldType.COUNTRY, "FR", "France"),
        (FieldType.POSTAL_CODE, "75008", "!"),
        (FieldType.TAX_ID, "FR12 345 678 901", "?"),
        (FieldType.URL, "https://acme.test/x", "ftp://acme.test"),
        (FieldType.CHECKBOX, True, "yes"),
        (FieldType.ADDRESS, {"line1": "1 rue", "city": "Paris", "country_code": "FR"}, {"line1": "1 rue"}),
    ],
)
def test_field_type_validators(ftype: FieldType, good: Any, bad: Any) -> None:
    f = FormField(key="f", label="F", type=ftype)
    assert check_value(f, good) is None
    assert check_value(f, bad) is not None


def test_choice_length_range_and_allowed_values() -> None:
    multi = FormField(
        "m", "M", FieldType.MULTI_SELECT, options=("a", "b", "c"), validation=Validation(max_items=2)
    )
    assert check_value(multi, ["a", "b"]) is None
    assert check_value(multi, ["a", "b", "c"]) is not None
    assert check_value(multi, ["z"]) is not None
    text = FormField(
        "t", "T", FieldType.TEXT, validation=Validation(min_length=3, max_length=5, allowed_values=("abcd",))
    )
    assert check_value(text, "ab") is not None and check_value(text, "abcdef") is not None
    assert check_value(text, "abcd") is None and check_value(text, "abce") is not None
    agreement = FormField("g", "G", FieldType.AGREEMENT, required=True, agreement_code="terms")
    assert check_value(agreement, False) is not None and check_value(agreement, True) is None


def test_definition_checks() -> None:
    bad = [
        {
            "key": "s",
            "sections": [
                {
                    "key": "x",
                    "fields": [
                        {"key": "a", "type": "FIELD_TYPE_SELECT"},
                        {"key": "a", "type": "FIELD_TYPE_TEXT", "validation": {"pattern": "("}},
                        {
                            "key": "b",
                            "type": "FIELD_TYPE_TEXT",
                            "visible_when": {
                                "clauses": [{"field_key": "later", "operator": "OPERATOR_IS_SET"}]
                            },
                        },
                        {"key": "later", "type": "FIELD_TYPE_FILE"},
                        {"key": "c", "type": "FIELD_TYPE_WHATEVER"},
                    ],
                }
            ],
        }
    ]
    form, v = parse_definition(bad)
    check_definition(form, v)
    got = {x.field for x in v.items}
    assert {
        "form.steps[0].sections[0].fields[0].options",
        "form.steps[0].sections[0].fields[1].key",
        "form.steps[0].sections[0].fields[1].validation.pattern",
        "form.steps[0].sections[0].fields[2].visible_when.clauses[0].field_key",
        "form.steps[0].sections[0].fields[3].document_type_code",
        "form.steps[0].sections[0].fields[4].type",
    } <= got


def _doc_type(limit: int = 10, types: tuple[str, ...] = ("application/pdf",)) -> DocumentType:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    return DocumentType("license", "License", "", types, limit, False, False, False, True, now, now)


def test_upload_guard_stops_at_the_limit_and_checks_the_type() -> None:
    guard = UploadGuard(_doc_type(limit=10), "application/pdf", "a.pdf")
    guard.feed(b"%PDF-")
    guard.feed(b"12345")
    with pytest.raises(ResourceExhausted) as exc:
        guard.feed(b"6")
    assert exc.value.reason == "DOCUMENT_TOO_LARGE"
    with pytest.raises(InvalidArgument) as exc2:
        UploadGuard(_doc_type(), "image/png", "a.png")
    assert exc2.value.reason == "DOCUMENT_TYPE_NOT_ALLOWED"
    liar = UploadGuard(_doc_type(limit=100), "application/pdf", "a.pdf")
    with pytest.raises(InvalidArgument) as exc3:
        liar.feed(b"MZ\x90\x00 an executable")
    assert exc3.value.reason == "DOCUMENT_CONTENT_MISMATCH"
    ok = UploadGuard(_doc_type(limit=100), "application/pdf", "a.pdf")
    for piece in (b"%P", b"DF-1.7", b" body"):
        ok.feed(piece)
    content, sha = ok.finish()
    import hashlib

    assert content == b"%PDF-1.7 body" and sha == hashlib.sha256(content).hexdigest()
    short = UploadGuard(_doc_type(limit=100), "application/pdf", "a.pdf")
    short.feed(b"%P")
    with pytest.raises(InvalidArgument):
        short.finish()
