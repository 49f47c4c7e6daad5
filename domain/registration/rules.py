"""Geo rules: require / block / exempt, and AND/OR requirement groups.

Pure code. Precedence when several rules match an address (also written in
the .proto, next to RegistrationRule):

1. Specificity of a rule = the most specific geo dimension it constrains:
   postal code 5 > city 4 > county 3 > state 2 > country 1 > none 0.
2. An EXEMPT rule lifts every matching REQUIRE or BLOCK rule whose
   (specificity, priority) is strictly lower than its own. So "exempt postal
   code 10001" lifts "require X in US", and "block state" can be exempted for
   one city, but an equally specific, equally ranked BLOCK stays (fail closed).
3. Any BLOCK left blocks the address; the one reported is the most specific,
   then the highest priority, then the oldest (id order as tie-break).
4. The requirements are the ALL of the REQUIRE rules left.

Within a GeoCondition the dimensions combine with AND and the values of one
dimension with OR; an empty dimension matches anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from domain.registration.forms import enum_name
from domain.shared.errors import Violations


@dataclass(frozen=True)
class Address:
    country_code: str = ""
    state: str = ""
    county: str = ""
    city: str = ""
    postal_code: str = ""
    line1: str = ""
    line2: str = ""

    @staticmethod
    def from_dict(d: Mapping[str, Any] | None) -> Address:
        d = d or {}
        return Address(**{k: str(d.get(k, "") or "") for k in Address.__dataclass_fields__})

    def as_dict(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in Address.__dataclass_fields__}

    def is_empty(self) -> bool:
        return not any(self.as_dict().values())


@dataclass(frozen=True)
class PostalMatch:
    kind: str  # exact | prefix | range
    first: str
    last: str = ""

    def matches(self, code: str) -> bool:
        c = normalize_postal(code)
        if not c:
            return False
        if self.kind == "exact":
            return c == normalize_postal(self.first)
        if self.kind == "prefix":
            return c.startswith(normalize_postal(self.first))
        lo, hi = normalize_postal(self.first), normalize_postal(self.last)
        if lo.isdigit() and hi.isdigit() and c.isdigit():
            return int(lo) <= int(c) <= int(hi)
        # Alphanumeric ranges only make sense between codes of one shape.
        return len(c) == len(lo) == len(hi) and lo <= c <= hi


def normalize_postal(code: str) -> str:
    return re.sub(r"[\s-]", "", code).upper()


def _norm(s: str) -> str:
    return " ".join(s.split()).casefold()


@dataclass(frozen=True)
class GeoCondition:
    countries: tuple[str, ...] = ()
    states: tuple[str, ...] = ()
    counties: tuple[str, ...] = ()
    cities: tuple[str, ...] = ()
    postal_codes: tuple[PostalMatch, ...] = ()

    def specificity(self) -> int:
        for level, dim in ((5, self.postal_codes), (4, self.cities), (3, self.counties), (2, self.states)):
            if dim:
                return level
        return 1 if self.countries else 0

    def matches(self, a: Address) -> bool:
        country = a.country_code.upper()
        if self.countries and country not in {c.upper() for c in self.countries}:
            return False
        if self.states:
            state = _norm(a.state)
            wanted = {_norm(s) for s in self.states}
            if not state or (state not in wanted and f"{country.casefold()}-{state}" not in wanted):
                return False
        if self.counties and _norm(a.county) not in {_norm(c) for c in self.counties}:
            return False
        if self.cities and _norm(a.city) not in {_norm(c) for c in self.cities}:
            return False
        return not self.postal_codes or any(p.matches(a.postal_code) for p in self.postal_codes)


@dataclass(frozen=True)
class Requirement:
    kind: str  # document | agreement | field
    code: str

    def as_dict(self) -> dict[str, str]:
        return {REQUIREMENT_KEYS[self.kind]: self.code}


REQUIREMENT_KEYS = {"document": "document_type_code", "agreement": "agreement_code", "field": "field_key"}


@dataclass(frozen=True)
class RequirementGroup:
    any_of: bool = False
    requirements: tuple[Requirement, ...] = ()
    groups: tuple[RequirementGroup, ...] = ()

    def is_empty(self) -> bool:
        return not self.requirements and all(g.is_empty() for g in self.groups)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"operator": "OPERATOR_ANY" if self.any_of else "OPERATOR_ALL"}
        if self.requirements:
            out["requirements"] = [r.as_dict() for r in self.requirements]
        if self.groups:
            out["groups"] = [g.as_dict() for g in self.groups]
        return out

    def leaves(self) -> Iterable[Requirement]:
        yield from self.requirements
        for g in self.groups:
            yield from g.leaves()


@dataclass(frozen=True)
class Satisfied:
    """What a registration has: uploaded (not rejected) documents, signed agreements, answered fields."""

    documents: frozenset[str] = frozenset()
    agreements: frozenset[str] = frozenset()
    fields: frozenset[str] = frozenset()

    def has(self, r: Requirement) -> bool:
        pool = {"document": self.documents, "agreement": self.agreements, "field": self.fields}[r.kind]
        return r.code in pool


def requirement_status(group: RequirementGroup, have: Satisfied) -> tuple[bool, list[Requirement]]:
    """(satisfied, missing leaves). An empty group is satisfied; an empty ANY group too."""
    results: list[tuple[bool, list[Requirement]]] = [
        (have.has(r), [] if have.has(r) else [r]) for r in group.requirements
    ]
    results += [requirement_status(g, have) for g in group.groups if not g.is_empty()]
    if not results:
        return True, []
    if group.any_of:
        if any(ok for ok, _ in results):
            return True, []
        return False, [m for _, missing in results for m in missing]
    missing = [m for ok, ms in results if not ok for m in ms]
    return not missing, missing


@dataclass(frozen=True)
class Rule:
    id: str
    name: str
    type: str  # require | block | exempt
    geo: GeoCondition = field(default_factory=GeoCondition)
    requirements: RequirementGroup = field(default_factory=RequirementGroup)
    reason: str = ""
    priority: int = 0
    form_id: str = ""
    active: bool = True

    def rank(self) -> tuple[int, int]:
        return (self.geo.specificity(), self.priority)


@dataclass(frozen=True)
class Evaluation:
    blocked: bool
    blocking_rule: Rule | None
    requirements: RequirementGroup
    applied: tuple[Rule, ...]
    exempted: tuple[Rule, ...]

    @property
    def reason(self) -> str:
        return self.blocking_rule.reason if self.blocking_rule else ""


def evaluate(rules: Sequence[Rule], address: Address, form_id: str = "") -> Evaluation:
    matched = [
        r
        for r in rules
        if r.active and (not r.form_id or not form_id or r.form_id == form_id) and r.geo.matches(address)
    ]
    exempts = [r for r in matched if r.type == "exempt"]
    applied: list[Rule] = []
    exempted: list[Rule] = []
    for r in matched:
        if r.type == "exempt":
            continue
        if any(e.rank() > r.rank() for e in exempts):
            exempted.append(r)
        else:
            applied.append(r)
    blocks = sorted(
        (r for r in applied if r.type == "block"), key=lambda r: (-r.rank()[0], -r.rank()[1], r.id)
    )
    groups = tuple(r.requirements for r in applied if r.type == "require" and not r.requirements.is_empty())
    return Evaluation(
        blocked=bool(blocks),
        blocking_rule=blocks[0] if blocks else None,
        requirements=RequirementGroup(any_of=False, groups=groups),
        applied=tuple(applied),
        exempted=tuple(exempted),
    )


# ------------------------------------------------------------------ parsing (canonical JSON)


def parse_geo(raw: Mapping[str, Any] | None, path: str, v: Violations) -> GeoCondition:
    raw = raw or {}
    postal: list[PostalMatch] = []
    for i, p in enumerate(raw.get("postal_codes", [])):
        if p.get("exact"):
            postal.append(PostalMatch("exact", str(p["exact"])))
        elif p.get("prefix"):
            postal.append(PostalMatch("prefix", str(p["prefix"])))
        elif p.get("range"):
            first, last = str(p["range"].get("first", "")), str(p["range"].get("last", ""))
            lo, hi = normalize_postal(first), normalize_postal(last)
            if not lo or not hi:
                v.add(f"{path}.postal_codes[{i}].range", "needs first and last")
            elif lo.isdigit() and hi.isdigit():
                if int(lo) > int(hi):
                    v.add(f"{path}.postal_codes[{i}].range", "first is after last")
            elif len(lo) != len(hi) or lo > hi:
                v.add(
                    f"{path}.postal_codes[{i}].range",
                    "alphanumeric bounds must have one length, first <= last",
                )
            postal.append(PostalMatch("range", first, last))
        else:
            v.add(f"{path}.postal_codes[{i}]", "one of exact, prefix or range is required")
    countries = tuple(str(c).upper() for c in raw.get("countries", []))
    for i, c in enumerate(countries):
        if not re.fullmatch(r"[A-Z]{2}", c):
            v.add(f"{path}.countries[{i}]", "must be ISO-3166-1 alpha-2")
    return GeoCondition(
        countries=countries,
        states=tuple(str(s) for s in raw.get("states", [])),
        counties=tuple(str(s) for s in raw.get("counties", [])),
        cities=tuple(str(s) for s in raw.get("cities", [])),
        postal_codes=tuple(postal),
    )


def parse_requirements(
    raw: Mapping[str, Any] | None, path: str, v: Violations, depth: int = 0
) -> RequirementGroup:
    raw = raw or {}
    if depth > 8:
        v.add(path, "requirement groups nest at most 8 deep")
        return RequirementGroup()
    reqs: list[Requirement] = []
    for i, r in enumerate(raw.get("requirements", [])):
        found = [(kind, str(r[key])) for kind, key in REQUIREMENT_KEYS.items() if r.get(key)]
        if len(found) != 1:
            v.add(
                f"{path}.requirements[{i}]",
                "one of document_type_code, agreement_code or field_key is required",
            )
            continue
        reqs.append(Requirement(*found[0]))
    groups = tuple(
        parse_requirements(g, f"{path}.groups[{i}]", v, depth + 1)
        for i, g in enumerate(raw.get("groups", []))
    )
    return RequirementGroup(
        any_of=enum_name(raw.get("operator"), "OPERATOR_") == "any", requirements=tuple(reqs), groups=groups
    )
