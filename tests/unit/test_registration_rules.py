"""Geo rule engine: matching, precedence, AND/OR requirement groups."""

from __future__ import annotations

from domain.registration.rules import (
    Address,
    GeoCondition,
    PostalMatch,
    Requirement,
    RequirementGroup,
    Rule,
    Satisfied,
    evaluate,
    parse_geo,
    parse_requirements,
    requirement_status,
)
from domain.shared.errors import Violations

NY = Address(country_code="US", state="NY", county="New York", city="New York", postal_code="10001")
CA = Address(country_code="US", state="CA", county="Los Angeles", city="Los Angeles", postal_code="90012")
PARIS = Address(country_code="FR", city="Paris", postal_code="75008")

LICENSE = RequirementGroup(requirements=(Requirement("document", "license"),))


def test_postal_matchers_exact_prefix_numeric_and_alpha_ranges() -> None:
    assert PostalMatch("exact", "10001").matches("10001")
    assert not PostalMatch("exact", "10001").matches("10002")
    assert PostalMatch("prefix", "100").matches("10099")
    assert not PostalMatch("prefix", "100").matches("11000")
    assert PostalMatch("range", "90000", "96199").matches("90012")
    assert not PostalMatch("range", "90000", "96199").matches("96200")
    # Normalisation: case, spaces and dashes do not matter.
    assert PostalMatch("exact", "sw1a 1aa").matches("SW1A-1AA")
    assert PostalMatch("range", "SW1A1AA", "SW1Z9ZZ").matches("sw1b 2cd")
    assert not PostalMatch("range", "SW1A1AA", "SW1Z9ZZ").matches("SW2A1AA")
    # Alphanumeric ranges only compare codes of the same length.
    assert not PostalMatch("range", "SW1A1AA", "SW1Z9ZZ").matches("SW1B")
    assert not PostalMatch("exact", "10001").matches("")


def test_geo_dimensions_and_together_values_or_together() -> None:
    geo = GeoCondition(countries=("US",), states=("NY", "US-CA"))
    assert geo.matches(NY) and geo.matches(CA)
    assert not geo.matches(PARIS)
    assert GeoCondition(counties=("new  york",)).matches(NY)  # case and spacing insensitive
    assert GeoCondition(cities=("los angeles",)).matches(CA)
    assert not GeoCondition(countries=("US",), cities=("Paris",)).matches(PARIS)
    assert GeoCondition().matches(PARIS)  # empty condition matches everything
    assert GeoCondition(states=("NY",)).specificity() == 2
    assert GeoCondition(countries=("US",), postal_codes=(PostalMatch("exact", "1"),)).specificity() == 5


def test_block_a_state() -> None:
    rules = [
        Rule(
            "r1",
            "no NY",
            "block",
            GeoCondition(countries=("US",), states=("NY",)),
            reason="not licensed in NY",
        )
    ]
    ev = evaluate(rules, NY)
    assert ev.blocked and ev.blocking_rule is not None and ev.blocking_rule.id == "r1"
    assert ev.reason == "not licensed in NY"
    assert not evaluate(rules, CA).blocked


def test_exempt_postal_code_inside_required_country() -> None:
    rules = [
        Rule("req", "US license", "require", GeoCondition(countries=("US",)), requirements=LICENSE),
        Rule(
            "ex",
            "NYC exempt",
            "exempt",
            GeoCondition(countries=("US",), postal_codes=(PostalMatch("exact", "10001"),)),
        ),
    ]
    ny = evaluate(rules, NY)
    assert not ny.blocked and ny.requirements.is_empty()
    assert [r.id for r in ny.exempted] == ["req"]
    ca = evaluate(rules, CA)
    assert [r.id for r in ca.applied] == ["req"]
    assert list(ca.requirements.leaves()) == [Requirement("document", "license")]


def test_exempt_lifts_less_specific_block_but_not_an_equal_one() -> None:
    block_state = Rule("b", "no CA", "block", GeoCondition(states=("CA",)), reason="no")
    exempt_city = Rule("e", "LA ok", "exempt", GeoCondition(cities=("Los Angeles",)))
    assert not evaluate([block_state, exempt_city], CA).blocked
    # Same specificity and priority: block wins (fail closed).
    exempt_state = Rule("e2", "CA ok", "exempt", GeoCondition(states=("CA",)))
    assert evaluate([block_state, exempt_state], CA).blocked
    # ... unless the exempt has the higher priority.
    exempt_state_hi = Rule("e3", "CA ok", "exempt", GeoCondition(states=("CA",)), priority=5)
    assert not evaluate([block_state, exempt_state_hi], CA).blocked


def test_most_specific_block_is_reported_and_inactive_or_other_form_rules_ignored() -> None:
    country = Rule("c", "no US", "block", GeoCondition(countries=("US",)), reason="country")
    city = Rule("z", "no NYC", "block", GeoCondition(cities=("New York",)), reason="city")
    ev = evaluate([country, city], NY)
    assert ev.blocking_rule is not None and ev.blocking_rule.id == "z"
    inactive = Rule("i", "off", "block", GeoCondition(), reason="x", active=False)
    other_form = Rule("o", "other", "block", GeoCondition(), reason="x", form_id="frm_other")
    assert not evaluate([inactive, other_form], NY, form_id="frm_mine").blocked


def test_and_or_requirement_groups() -> None:
    # license AND (w9 OR (passport AND terms))
    group = RequirementGroup(
        requirements=(Requirement("document", "license"),),
        groups=(
            RequirementGroup(
                any_of=True,
                requirements=(Requirement("document", "w9"),),
                groups=(
                    RequirementGroup(
                        requirements=(Requirement("document", "passport"), Requirement("agreement", "terms"))
                    ),
                ),
            ),
        ),
    )
    ok, missing = requirement_status(group, Satisfied())
    assert (
        not ok and Requirement("document", "license") in missing and Requirement("document", "w9") in missing
    )
    assert requirement_status(group, Satisfied(documents=frozenset({"license", "w9"})))[0]
    assert requirement_status(
        group, Satisfied(documents=frozenset({"license", "passport"}), agreements=frozenset({"terms"}))
    )[0]
    ok, missing = requirement_status(group, Satisfied(documents=frozenset({"license", "passport"})))
    assert not ok and Requirement("agreement", "terms") in missing
    assert requirement_status(RequirementGroup(), Satisfied())[0]
    assert requirement_status(
        RequirementGroup(requirements=(Requirement("field", "vat"),)), Satisfied(fields=frozenset({"vat"}))
    )[0]


def test_parse_round_trip_and_bad_input() -> None:
    v = Violations()
    group = parse_requirements(
        {
            "operator": "OPERATOR_ANY",
            "requirements": [{"document_type_code": "w9"}, {"agreement_code": "terms"}],
            "groups": [{"requirements": [{"field_key": "vat"}]}],
        },
        "r",
        v,
    )
    assert not v and group.any_of and len(group.requirements) == 2
    assert parse_requirements(group.as_dict(), "r", v) == group
    parse_requirements({"requirements": [{}]}, "r", v)
    geo = parse_geo(
        {"countries": ["usa"], "postal_codes": [{"range": {"first": "9", "last": "1"}}, {}]}, "g", v
    )
    assert {x.field for x in v.items} == {
        "r.requirements[0]",
        "g.countries[0]",
        "g.postal_codes[0].range",
        "g.postal_codes[1]",
    }
    assert geo.countries == ("USA",)
