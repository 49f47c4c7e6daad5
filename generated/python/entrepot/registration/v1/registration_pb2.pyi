import datetime

from entrepot.auth.v1 import auth_pb2 as _auth_pb2
from entrepot.platform.v1 import types_pb2 as _types_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FieldType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FIELD_TYPE_UNSPECIFIED: _ClassVar[FieldType]
    FIELD_TYPE_TEXT: _ClassVar[FieldType]
    FIELD_TYPE_TEXTAREA: _ClassVar[FieldType]
    FIELD_TYPE_EMAIL: _ClassVar[FieldType]
    FIELD_TYPE_PHONE: _ClassVar[FieldType]
    FIELD_TYPE_NUMBER: _ClassVar[FieldType]
    FIELD_TYPE_DECIMAL: _ClassVar[FieldType]
    FIELD_TYPE_DATE: _ClassVar[FieldType]
    FIELD_TYPE_SELECT: _ClassVar[FieldType]
    FIELD_TYPE_MULTI_SELECT: _ClassVar[FieldType]
    FIELD_TYPE_RADIO: _ClassVar[FieldType]
    FIELD_TYPE_CHECKBOX: _ClassVar[FieldType]
    FIELD_TYPE_COUNTRY: _ClassVar[FieldType]
    FIELD_TYPE_STATE: _ClassVar[FieldType]
    FIELD_TYPE_POSTAL_CODE: _ClassVar[FieldType]
    FIELD_TYPE_ADDRESS: _ClassVar[FieldType]
    FIELD_TYPE_TAX_ID: _ClassVar[FieldType]
    FIELD_TYPE_URL: _ClassVar[FieldType]
    FIELD_TYPE_FILE: _ClassVar[FieldType]
    FIELD_TYPE_SIGNATURE: _ClassVar[FieldType]
    FIELD_TYPE_AGREEMENT: _ClassVar[FieldType]
    FIELD_TYPE_DATETIME: _ClassVar[FieldType]
    FIELD_TYPE_HIDDEN: _ClassVar[FieldType]
    FIELD_TYPE_COMPANY_NUMBER: _ClassVar[FieldType]

class CommerceMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMERCE_MODE_UNSPECIFIED: _ClassVar[CommerceMode]
    COMMERCE_MODE_B2B: _ClassVar[CommerceMode]
    COMMERCE_MODE_B2C: _ClassVar[CommerceMode]
    COMMERCE_MODE_BOTH: _ClassVar[CommerceMode]

class SignatureMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIGNATURE_METHOD_UNSPECIFIED: _ClassVar[SignatureMethod]
    SIGNATURE_METHOD_DRAWN: _ClassVar[SignatureMethod]
    SIGNATURE_METHOD_TYPED: _ClassVar[SignatureMethod]
    SIGNATURE_METHOD_CHECKBOX: _ClassVar[SignatureMethod]
    SIGNATURE_METHOD_EXTERNAL: _ClassVar[SignatureMethod]
FIELD_TYPE_UNSPECIFIED: FieldType
FIELD_TYPE_TEXT: FieldType
FIELD_TYPE_TEXTAREA: FieldType
FIELD_TYPE_EMAIL: FieldType
FIELD_TYPE_PHONE: FieldType
FIELD_TYPE_NUMBER: FieldType
FIELD_TYPE_DECIMAL: FieldType
FIELD_TYPE_DATE: FieldType
FIELD_TYPE_SELECT: FieldType
FIELD_TYPE_MULTI_SELECT: FieldType
FIELD_TYPE_RADIO: FieldType
FIELD_TYPE_CHECKBOX: FieldType
FIELD_TYPE_COUNTRY: FieldType
FIELD_TYPE_STATE: FieldType
FIELD_TYPE_POSTAL_CODE: FieldType
FIELD_TYPE_ADDRESS: FieldType
FIELD_TYPE_TAX_ID: FieldType
FIELD_TYPE_URL: FieldType
FIELD_TYPE_FILE: FieldType
FIELD_TYPE_SIGNATURE: FieldType
FIELD_TYPE_AGREEMENT: FieldType
FIELD_TYPE_DATETIME: FieldType
FIELD_TYPE_HIDDEN: FieldType
FIELD_TYPE_COMPANY_NUMBER: FieldType
COMMERCE_MODE_UNSPECIFIED: CommerceMode
COMMERCE_MODE_B2B: CommerceMode
COMMERCE_MODE_B2C: CommerceMode
COMMERCE_MODE_BOTH: CommerceMode
SIGNATURE_METHOD_UNSPECIFIED: SignatureMethod
SIGNATURE_METHOD_DRAWN: SignatureMethod
SIGNATURE_METHOD_TYPED: SignatureMethod
SIGNATURE_METHOD_CHECKBOX: SignatureMethod
SIGNATURE_METHOD_EXTERNAL: SignatureMethod

class FieldOption(_message.Message):
    __slots__ = ("value", "label")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    value: str
    label: str
    def __init__(self, value: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class FieldValidation(_message.Message):
    __slots__ = ("pattern", "min_length", "max_length", "min_value", "max_value", "allowed_values", "min_items", "max_items")
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    MIN_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MIN_VALUE_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUE_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_VALUES_FIELD_NUMBER: _ClassVar[int]
    MIN_ITEMS_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_FIELD_NUMBER: _ClassVar[int]
    pattern: str
    min_length: int
    max_length: int
    min_value: str
    max_value: str
    allowed_values: _containers.RepeatedScalarFieldContainer[str]
    min_items: int
    max_items: int
    def __init__(self, pattern: _Optional[str] = ..., min_length: _Optional[int] = ..., max_length: _Optional[int] = ..., min_value: _Optional[str] = ..., max_value: _Optional[str] = ..., allowed_values: _Optional[_Iterable[str]] = ..., min_items: _Optional[int] = ..., max_items: _Optional[int] = ...) -> None: ...

class VisibilityCondition(_message.Message):
    __slots__ = ("match", "clauses")
    class Match(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        MATCH_UNSPECIFIED: _ClassVar[VisibilityCondition.Match]
        MATCH_ALL: _ClassVar[VisibilityCondition.Match]
        MATCH_ANY: _ClassVar[VisibilityCondition.Match]
    MATCH_UNSPECIFIED: VisibilityCondition.Match
    MATCH_ALL: VisibilityCondition.Match
    MATCH_ANY: VisibilityCondition.Match
    class Operator(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OPERATOR_UNSPECIFIED: _ClassVar[VisibilityCondition.Operator]
        OPERATOR_EQUALS: _ClassVar[VisibilityCondition.Operator]
        OPERATOR_NOT_EQUALS: _ClassVar[VisibilityCondition.Operator]
        OPERATOR_IN: _ClassVar[VisibilityCondition.Operator]
        OPERATOR_NOT_IN: _ClassVar[VisibilityCondition.Operator]
        OPERATOR_IS_SET: _ClassVar[VisibilityCondition.Operator]
        OPERATOR_IS_NOT_SET: _ClassVar[VisibilityCondition.Operator]
    OPERATOR_UNSPECIFIED: VisibilityCondition.Operator
    OPERATOR_EQUALS: VisibilityCondition.Operator
    OPERATOR_NOT_EQUALS: VisibilityCondition.Operator
    OPERATOR_IN: VisibilityCondition.Operator
    OPERATOR_NOT_IN: VisibilityCondition.Operator
    OPERATOR_IS_SET: VisibilityCondition.Operator
    OPERATOR_IS_NOT_SET: VisibilityCondition.Operator
    class Clause(_message.Message):
        __slots__ = ("field_key", "operator", "values")
        FIELD_KEY_FIELD_NUMBER: _ClassVar[int]
        OPERATOR_FIELD_NUMBER: _ClassVar[int]
        VALUES_FIELD_NUMBER: _ClassVar[int]
        field_key: str
        operator: VisibilityCondition.Operator
        values: _containers.RepeatedScalarFieldContainer[str]
        def __init__(self, field_key: _Optional[str] = ..., operator: _Optional[_Union[VisibilityCondition.Operator, str]] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...
    MATCH_FIELD_NUMBER: _ClassVar[int]
    CLAUSES_FIELD_NUMBER: _ClassVar[int]
    match: VisibilityCondition.Match
    clauses: _containers.RepeatedCompositeFieldContainer[VisibilityCondition.Clause]
    def __init__(self, match: _Optional[_Union[VisibilityCondition.Match, str]] = ..., clauses: _Optional[_Iterable[_Union[VisibilityCondition.Clause, _Mapping]]] = ...) -> None: ...

class FieldMapping(_message.Message):
    __slots__ = ("target", "path")
    class Target(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TARGET_UNSPECIFIED: _ClassVar[FieldMapping.Target]
        TARGET_ACCOUNT: _ClassVar[FieldMapping.Target]
        TARGET_ADDRESS: _ClassVar[FieldMapping.Target]
        TARGET_META: _ClassVar[FieldMapping.Target]
        TARGET_DOCUMENT: _ClassVar[FieldMapping.Target]
    TARGET_UNSPECIFIED: FieldMapping.Target
    TARGET_ACCOUNT: FieldMapping.Target
    TARGET_ADDRESS: FieldMapping.Target
    TARGET_META: FieldMapping.Target
    TARGET_DOCUMENT: FieldMapping.Target
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    target: FieldMapping.Target
    path: str
    def __init__(self, target: _Optional[_Union[FieldMapping.Target, str]] = ..., path: _Optional[str] = ...) -> None: ...

class FormField(_message.Message):
    __slots__ = ("key", "label", "type", "help_text", "required", "options", "validation", "visible_when", "maps_to", "document_type_code", "agreement_code")
    KEY_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    HELP_TEXT_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    VISIBLE_WHEN_FIELD_NUMBER: _ClassVar[int]
    MAPS_TO_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_TYPE_CODE_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_CODE_FIELD_NUMBER: _ClassVar[int]
    key: str
    label: str
    type: FieldType
    help_text: str
    required: bool
    options: _containers.RepeatedCompositeFieldContainer[FieldOption]
    validation: FieldValidation
    visible_when: VisibilityCondition
    maps_to: FieldMapping
    document_type_code: str
    agreement_code: str
    def __init__(self, key: _Optional[str] = ..., label: _Optional[str] = ..., type: _Optional[_Union[FieldType, str]] = ..., help_text: _Optional[str] = ..., required: _Optional[bool] = ..., options: _Optional[_Iterable[_Union[FieldOption, _Mapping]]] = ..., validation: _Optional[_Union[FieldValidation, _Mapping]] = ..., visible_when: _Optional[_Union[VisibilityCondition, _Mapping]] = ..., maps_to: _Optional[_Union[FieldMapping, _Mapping]] = ..., document_type_code: _Optional[str] = ..., agreement_code: _Optional[str] = ...) -> None: ...

class FormSection(_message.Message):
    __slots__ = ("key", "title", "visible_when", "fields")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    VISIBLE_WHEN_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    key: str
    title: str
    visible_when: VisibilityCondition
    fields: _containers.RepeatedCompositeFieldContainer[FormField]
    def __init__(self, key: _Optional[str] = ..., title: _Optional[str] = ..., visible_when: _Optional[_Union[VisibilityCondition, _Mapping]] = ..., fields: _Optional[_Iterable[_Union[FormField, _Mapping]]] = ...) -> None: ...

class FormStep(_message.Message):
    __slots__ = ("key", "title", "visible_when", "sections")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    VISIBLE_WHEN_FIELD_NUMBER: _ClassVar[int]
    SECTIONS_FIELD_NUMBER: _ClassVar[int]
    key: str
    title: str
    visible_when: VisibilityCondition
    sections: _containers.RepeatedCompositeFieldContainer[FormSection]
    def __init__(self, key: _Optional[str] = ..., title: _Optional[str] = ..., visible_when: _Optional[_Union[VisibilityCondition, _Mapping]] = ..., sections: _Optional[_Iterable[_Union[FormSection, _Mapping]]] = ...) -> None: ...

class RegistrationForm(_message.Message):
    __slots__ = ("id", "slug", "channel", "name", "description", "version", "customer_group", "invitation_required", "steps", "expire_after", "active", "create_time", "update_time", "commerce_mode")
    ID_FIELD_NUMBER: _ClassVar[int]
    SLUG_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_GROUP_FIELD_NUMBER: _ClassVar[int]
    INVITATION_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_AFTER_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    COMMERCE_MODE_FIELD_NUMBER: _ClassVar[int]
    id: str
    slug: str
    channel: str
    name: str
    description: str
    version: int
    customer_group: str
    invitation_required: bool
    steps: _containers.RepeatedCompositeFieldContainer[FormStep]
    expire_after: _duration_pb2.Duration
    active: bool
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    commerce_mode: CommerceMode
    def __init__(self, id: _Optional[str] = ..., slug: _Optional[str] = ..., channel: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., version: _Optional[int] = ..., customer_group: _Optional[str] = ..., invitation_required: _Optional[bool] = ..., steps: _Optional[_Iterable[_Union[FormStep, _Mapping]]] = ..., expire_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., active: _Optional[bool] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., commerce_mode: _Optional[_Union[CommerceMode, str]] = ...) -> None: ...

class CreateRegistrationFormRequest(_message.Message):
    __slots__ = ("form", "request_id")
    FORM_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    form: RegistrationForm
    request_id: str
    def __init__(self, form: _Optional[_Union[RegistrationForm, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class UpdateRegistrationFormRequest(_message.Message):
    __slots__ = ("form", "update_mask", "request_id")
    FORM_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    form: RegistrationForm
    update_mask: _field_mask_pb2.FieldMask
    request_id: str
    def __init__(self, form: _Optional[_Union[RegistrationForm, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetRegistrationFormRequest(_message.Message):
    __slots__ = ("id", "slug", "version")
    ID_FIELD_NUMBER: _ClassVar[int]
    SLUG_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    id: str
    slug: str
    version: int
    def __init__(self, id: _Optional[str] = ..., slug: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ListRegistrationFormsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "commerce_mode")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    COMMERCE_MODE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    commerce_mode: CommerceMode
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., commerce_mode: _Optional[_Union[CommerceMode, str]] = ...) -> None: ...

class ListRegistrationFormsResponse(_message.Message):
    __slots__ = ("forms", "next_page_token")
    FORMS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    forms: _containers.RepeatedCompositeFieldContainer[RegistrationForm]
    next_page_token: str
    def __init__(self, forms: _Optional[_Iterable[_Union[RegistrationForm, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class PostalCodeMatch(_message.Message):
    __slots__ = ("exact", "prefix", "range")
    class Range(_message.Message):
        __slots__ = ("first", "last")
        FIRST_FIELD_NUMBER: _ClassVar[int]
        LAST_FIELD_NUMBER: _ClassVar[int]
        first: str
        last: str
        def __init__(self, first: _Optional[str] = ..., last: _Optional[str] = ...) -> None: ...
    EXACT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    exact: str
    prefix: str
    range: PostalCodeMatch.Range
    def __init__(self, exact: _Optional[str] = ..., prefix: _Optional[str] = ..., range: _Optional[_Union[PostalCodeMatch.Range, _Mapping]] = ...) -> None: ...

class GeoCondition(_message.Message):
    __slots__ = ("countries", "states", "counties", "cities", "postal_codes")
    COUNTRIES_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    COUNTIES_FIELD_NUMBER: _ClassVar[int]
    CITIES_FIELD_NUMBER: _ClassVar[int]
    POSTAL_CODES_FIELD_NUMBER: _ClassVar[int]
    countries: _containers.RepeatedScalarFieldContainer[str]
    states: _containers.RepeatedScalarFieldContainer[str]
    counties: _containers.RepeatedScalarFieldContainer[str]
    cities: _containers.RepeatedScalarFieldContainer[str]
    postal_codes: _containers.RepeatedCompositeFieldContainer[PostalCodeMatch]
    def __init__(self, countries: _Optional[_Iterable[str]] = ..., states: _Optional[_Iterable[str]] = ..., counties: _Optional[_Iterable[str]] = ..., cities: _Optional[_Iterable[str]] = ..., postal_codes: _Optional[_Iterable[_Union[PostalCodeMatch, _Mapping]]] = ...) -> None: ...

class Requirement(_message.Message):
    __slots__ = ("document_type_code", "agreement_code", "field_key")
    DOCUMENT_TYPE_CODE_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_CODE_FIELD_NUMBER: _ClassVar[int]
    FIELD_KEY_FIELD_NUMBER: _ClassVar[int]
    document_type_code: str
    agreement_code: str
    field_key: str
    def __init__(self, document_type_code: _Optional[str] = ..., agreement_code: _Optional[str] = ..., field_key: _Optional[str] = ...) -> None: ...

class RequirementGroup(_message.Message):
    __slots__ = ("operator", "requirements", "groups")
    class Operator(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OPERATOR_UNSPECIFIED: _ClassVar[RequirementGroup.Operator]
        OPERATOR_ALL: _ClassVar[RequirementGroup.Operator]
        OPERATOR_ANY: _ClassVar[RequirementGroup.Operator]
    OPERATOR_UNSPECIFIED: RequirementGroup.Operator
    OPERATOR_ALL: RequirementGroup.Operator
    OPERATOR_ANY: RequirementGroup.Operator
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    REQUIREMENTS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    operator: RequirementGroup.Operator
    requirements: _containers.RepeatedCompositeFieldContainer[Requirement]
    groups: _containers.RepeatedCompositeFieldContainer[RequirementGroup]
    def __init__(self, operator: _Optional[_Union[RequirementGroup.Operator, str]] = ..., requirements: _Optional[_Iterable[_Union[Requirement, _Mapping]]] = ..., groups: _Optional[_Iterable[_Union[RequirementGroup, _Mapping]]] = ...) -> None: ...

class RegistrationRule(_message.Message):
    __slots__ = ("id", "channel", "name", "type", "geo", "requirements", "reason", "priority", "form_id", "active", "create_time")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[RegistrationRule.Type]
        TYPE_REQUIRE: _ClassVar[RegistrationRule.Type]
        TYPE_BLOCK: _ClassVar[RegistrationRule.Type]
        TYPE_EXEMPT: _ClassVar[RegistrationRule.Type]
    TYPE_UNSPECIFIED: RegistrationRule.Type
    TYPE_REQUIRE: RegistrationRule.Type
    TYPE_BLOCK: RegistrationRule.Type
    TYPE_EXEMPT: RegistrationRule.Type
    ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    GEO_FIELD_NUMBER: _ClassVar[int]
    REQUIREMENTS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    FORM_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    channel: str
    name: str
    type: RegistrationRule.Type
    geo: GeoCondition
    requirements: RequirementGroup
    reason: str
    priority: int
    form_id: str
    active: bool
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., channel: _Optional[str] = ..., name: _Optional[str] = ..., type: _Optional[_Union[RegistrationRule.Type, str]] = ..., geo: _Optional[_Union[GeoCondition, _Mapping]] = ..., requirements: _Optional[_Union[RequirementGroup, _Mapping]] = ..., reason: _Optional[str] = ..., priority: _Optional[int] = ..., form_id: _Optional[str] = ..., active: _Optional[bool] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateRegistrationRuleRequest(_message.Message):
    __slots__ = ("rule", "request_id")
    RULE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    rule: RegistrationRule
    request_id: str
    def __init__(self, rule: _Optional[_Union[RegistrationRule, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ListRegistrationRulesRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "form_id")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FORM_ID_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    form_id: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., form_id: _Optional[str] = ...) -> None: ...

class ListRegistrationRulesResponse(_message.Message):
    __slots__ = ("rules", "next_page_token")
    RULES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    rules: _containers.RepeatedCompositeFieldContainer[RegistrationRule]
    next_page_token: str
    def __init__(self, rules: _Optional[_Iterable[_Union[RegistrationRule, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class EvaluateRegistrationRulesRequest(_message.Message):
    __slots__ = ("address", "form_id")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FORM_ID_FIELD_NUMBER: _ClassVar[int]
    address: _types_pb2.PostalAddress
    form_id: str
    def __init__(self, address: _Optional[_Union[_types_pb2.PostalAddress, _Mapping]] = ..., form_id: _Optional[str] = ...) -> None: ...

class EvaluateRegistrationRulesResponse(_message.Message):
    __slots__ = ("blocked", "blocking_rule_id", "block_reason", "requirements", "applied_rule_ids", "exempted_rule_ids")
    BLOCKED_FIELD_NUMBER: _ClassVar[int]
    BLOCKING_RULE_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_REASON_FIELD_NUMBER: _ClassVar[int]
    REQUIREMENTS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_RULE_IDS_FIELD_NUMBER: _ClassVar[int]
    EXEMPTED_RULE_IDS_FIELD_NUMBER: _ClassVar[int]
    blocked: bool
    blocking_rule_id: str
    block_reason: str
    requirements: RequirementGroup
    applied_rule_ids: _containers.RepeatedScalarFieldContainer[str]
    exempted_rule_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, blocked: _Optional[bool] = ..., blocking_rule_id: _Optional[str] = ..., block_reason: _Optional[str] = ..., requirements: _Optional[_Union[RequirementGroup, _Mapping]] = ..., applied_rule_ids: _Optional[_Iterable[str]] = ..., exempted_rule_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DocumentType(_message.Message):
    __slots__ = ("code", "name", "description", "allowed_content_types", "max_size_bytes", "requires_expiration_date", "requires_number", "requires_issuing_authority", "active", "create_time", "update_time")
    CODE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_CONTENT_TYPES_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_EXPIRATION_DATE_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_NUMBER_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_ISSUING_AUTHORITY_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    code: str
    name: str
    description: str
    allowed_content_types: _containers.RepeatedScalarFieldContainer[str]
    max_size_bytes: int
    requires_expiration_date: bool
    requires_number: bool
    requires_issuing_authority: bool
    active: bool
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, code: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., allowed_content_types: _Optional[_Iterable[str]] = ..., max_size_bytes: _Optional[int] = ..., requires_expiration_date: _Optional[bool] = ..., requires_number: _Optional[bool] = ..., requires_issuing_authority: _Optional[bool] = ..., active: _Optional[bool] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateDocumentTypeRequest(_message.Message):
    __slots__ = ("document_type", "request_id")
    DOCUMENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    document_type: DocumentType
    request_id: str
    def __init__(self, document_type: _Optional[_Union[DocumentType, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetDocumentTypeRequest(_message.Message):
    __slots__ = ("code",)
    CODE_FIELD_NUMBER: _ClassVar[int]
    code: str
    def __init__(self, code: _Optional[str] = ...) -> None: ...

class ListDocumentTypesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDocumentTypesResponse(_message.Message):
    __slots__ = ("document_types", "next_page_token")
    DOCUMENT_TYPES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    document_types: _containers.RepeatedCompositeFieldContainer[DocumentType]
    next_page_token: str
    def __init__(self, document_types: _Optional[_Iterable[_Union[DocumentType, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateDocumentTypeRequest(_message.Message):
    __slots__ = ("document_type", "update_mask", "request_id")
    DOCUMENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    document_type: DocumentType
    update_mask: _field_mask_pb2.FieldMask
    request_id: str
    def __init__(self, document_type: _Optional[_Union[DocumentType, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class DeleteDocumentTypeRequest(_message.Message):
    __slots__ = ("code", "request_id")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    code: str
    request_id: str
    def __init__(self, code: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class DeleteDocumentTypeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgreementTemplate(_message.Message):
    __slots__ = ("code", "version", "title", "body", "body_sha256", "signature_required", "create_time")
    CODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    BODY_SHA256_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    code: str
    version: int
    title: str
    body: str
    body_sha256: str
    signature_required: bool
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, code: _Optional[str] = ..., version: _Optional[int] = ..., title: _Optional[str] = ..., body: _Optional[str] = ..., body_sha256: _Optional[str] = ..., signature_required: _Optional[bool] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateAgreementTemplateRequest(_message.Message):
    __slots__ = ("agreement", "request_id")
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    agreement: AgreementTemplate
    request_id: str
    def __init__(self, agreement: _Optional[_Union[AgreementTemplate, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class UpdateAgreementTemplateRequest(_message.Message):
    __slots__ = ("agreement", "request_id")
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    agreement: AgreementTemplate
    request_id: str
    def __init__(self, agreement: _Optional[_Union[AgreementTemplate, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetAgreementTemplateRequest(_message.Message):
    __slots__ = ("code", "version")
    CODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    code: str
    version: int
    def __init__(self, code: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ListAgreementTemplatesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAgreementTemplatesResponse(_message.Message):
    __slots__ = ("agreements", "next_page_token")
    AGREEMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    agreements: _containers.RepeatedCompositeFieldContainer[AgreementTemplate]
    next_page_token: str
    def __init__(self, agreements: _Optional[_Iterable[_Union[AgreementTemplate, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class InvitationCode(_message.Message):
    __slots__ = ("code", "form_id", "customer_group", "max_uses", "uses", "expire_time", "active", "create_time")
    CODE_FIELD_NUMBER: _ClassVar[int]
    FORM_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_GROUP_FIELD_NUMBER: _ClassVar[int]
    MAX_USES_FIELD_NUMBER: _ClassVar[int]
    USES_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    code: str
    form_id: str
    customer_group: str
    max_uses: int
    uses: int
    expire_time: _timestamp_pb2.Timestamp
    active: bool
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, code: _Optional[str] = ..., form_id: _Optional[str] = ..., customer_group: _Optional[str] = ..., max_uses: _Optional[int] = ..., uses: _Optional[int] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., active: _Optional[bool] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateInvitationCodeRequest(_message.Message):
    __slots__ = ("invitation_code", "request_id")
    INVITATION_CODE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    invitation_code: InvitationCode
    request_id: str
    def __init__(self, invitation_code: _Optional[_Union[InvitationCode, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetInvitationCodeRequest(_message.Message):
    __slots__ = ("code",)
    CODE_FIELD_NUMBER: _ClassVar[int]
    code: str
    def __init__(self, code: _Optional[str] = ...) -> None: ...

class ListInvitationCodesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListInvitationCodesResponse(_message.Message):
    __slots__ = ("invitation_codes", "next_page_token")
    INVITATION_CODES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    invitation_codes: _containers.RepeatedCompositeFieldContainer[InvitationCode]
    next_page_token: str
    def __init__(self, invitation_codes: _Optional[_Iterable[_Union[InvitationCode, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class StringList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class FieldValue(_message.Message):
    __slots__ = ("text", "choices", "flag", "address")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    text: str
    choices: StringList
    flag: bool
    address: _types_pb2.PostalAddress
    def __init__(self, text: _Optional[str] = ..., choices: _Optional[_Union[StringList, _Mapping]] = ..., flag: _Optional[bool] = ..., address: _Optional[_Union[_types_pb2.PostalAddress, _Mapping]] = ...) -> None: ...

class Account(_message.Message):
    __slots__ = ("id", "status", "company_name", "email", "customer_group", "address", "attributes", "create_time", "update_time")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[Account.Status]
        STATUS_PENDING: _ClassVar[Account.Status]
        STATUS_ACTIVE: _ClassVar[Account.Status]
        STATUS_DENIED: _ClassVar[Account.Status]
        STATUS_EXPIRED: _ClassVar[Account.Status]
    STATUS_UNSPECIFIED: Account.Status
    STATUS_PENDING: Account.Status
    STATUS_ACTIVE: Account.Status
    STATUS_DENIED: Account.Status
    STATUS_EXPIRED: Account.Status
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    COMPANY_NAME_FIELD_NUMBER: _ClassVar[int]
    EMAIL_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_GROUP_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: Account.Status
    company_name: str
    email: str
    customer_group: str
    address: _types_pb2.PostalAddress
    attributes: _containers.ScalarMap[str, str]
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[Account.Status, str]] = ..., company_name: _Optional[str] = ..., email: _Optional[str] = ..., customer_group: _Optional[str] = ..., address: _Optional[_Union[_types_pb2.PostalAddress, _Mapping]] = ..., attributes: _Optional[_Mapping[str, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DocumentVerification(_message.Message):
    __slots__ = ("status", "ocr_strategy", "verification_strategy", "confidence_bps", "extracted_fields", "note", "update_time")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[DocumentVerification.Status]
        STATUS_PENDING: _ClassVar[DocumentVerification.Status]
        STATUS_MANUAL_REVIEW: _ClassVar[DocumentVerification.Status]
        STATUS_VERIFIED: _ClassVar[DocumentVerification.Status]
        STATUS_REJECTED: _ClassVar[DocumentVerification.Status]
    STATUS_UNSPECIFIED: DocumentVerification.Status
    STATUS_PENDING: DocumentVerification.Status
    STATUS_MANUAL_REVIEW: DocumentVerification.Status
    STATUS_VERIFIED: DocumentVerification.Status
    STATUS_REJECTED: DocumentVerification.Status
    class ExtractedFieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OCR_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_BPS_FIELD_NUMBER: _ClassVar[int]
    EXTRACTED_FIELDS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    status: DocumentVerification.Status
    ocr_strategy: str
    verification_strategy: str
    confidence_bps: int
    extracted_fields: _containers.ScalarMap[str, str]
    note: str
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, status: _Optional[_Union[DocumentVerification.Status, str]] = ..., ocr_strategy: _Optional[str] = ..., verification_strategy: _Optional[str] = ..., confidence_bps: _Optional[int] = ..., extracted_fields: _Optional[_Mapping[str, str]] = ..., note: _Optional[str] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RegistrationDocument(_message.Message):
    __slots__ = ("id", "registration_id", "document_type_code", "filename", "content_type", "size_bytes", "sha256", "number", "issuing_authority", "expiration_date", "verification", "create_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    REGISTRATION_ID_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_TYPE_CODE_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    ISSUING_AUTHORITY_FIELD_NUMBER: _ClassVar[int]
    EXPIRATION_DATE_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    registration_id: str
    document_type_code: str
    filename: str
    content_type: str
    size_bytes: int
    sha256: str
    number: str
    issuing_authority: str
    expiration_date: str
    verification: DocumentVerification
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., registration_id: _Optional[str] = ..., document_type_code: _Optional[str] = ..., filename: _Optional[str] = ..., content_type: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., number: _Optional[str] = ..., issuing_authority: _Optional[str] = ..., expiration_date: _Optional[str] = ..., verification: _Optional[_Union[DocumentVerification, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AgreementSignature(_message.Message):
    __slots__ = ("id", "registration_id", "agreement_code", "agreement_version", "method", "signer_name", "signer_email", "ip_address", "user_agent", "content_sha256", "external_reference", "provider", "sign_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    REGISTRATION_ID_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_CODE_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SIGNER_NAME_FIELD_NUMBER: _ClassVar[int]
    SIGNER_EMAIL_FIELD_NUMBER: _ClassVar[int]
    IP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    USER_AGENT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    SIGN_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    registration_id: str
    agreement_code: str
    agreement_version: int
    method: SignatureMethod
    signer_name: str
    signer_email: str
    ip_address: str
    user_agent: str
    content_sha256: str
    external_reference: str
    provider: str
    sign_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., registration_id: _Optional[str] = ..., agreement_code: _Optional[str] = ..., agreement_version: _Optional[int] = ..., method: _Optional[_Union[SignatureMethod, str]] = ..., signer_name: _Optional[str] = ..., signer_email: _Optional[str] = ..., ip_address: _Optional[str] = ..., user_agent: _Optional[str] = ..., content_sha256: _Optional[str] = ..., external_reference: _Optional[str] = ..., provider: _Optional[str] = ..., sign_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RegistrationEvent(_message.Message):
    __slots__ = ("from_state", "to_state", "actor", "note", "time")
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    from_state: Registration.State
    to_state: Registration.State
    actor: str
    note: str
    time: _timestamp_pb2.Timestamp
    def __init__(self, from_state: _Optional[_Union[Registration.State, str]] = ..., to_state: _Optional[_Union[Registration.State, str]] = ..., actor: _Optional[str] = ..., note: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RequirementStatus(_message.Message):
    __slots__ = ("satisfied", "missing")
    SATISFIED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    satisfied: bool
    missing: _containers.RepeatedCompositeFieldContainer[Requirement]
    def __init__(self, satisfied: _Optional[bool] = ..., missing: _Optional[_Iterable[_Union[Requirement, _Mapping]]] = ...) -> None: ...

class Registration(_message.Message):
    __slots__ = ("id", "channel", "form_id", "form_version", "state", "answers", "address", "invitation_code", "customer_group", "requirements", "requirement_status", "account", "documents", "signatures", "history", "decision", "decision_note", "reviewer", "expire_time", "create_time", "update_time")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Registration.State]
        STATE_SUBMITTED: _ClassVar[Registration.State]
        STATE_DOCUMENTS_PENDING: _ClassVar[Registration.State]
        STATE_IN_REVIEW: _ClassVar[Registration.State]
        STATE_APPROVED: _ClassVar[Registration.State]
        STATE_DENIED: _ClassVar[Registration.State]
        STATE_EXPIRED: _ClassVar[Registration.State]
    STATE_UNSPECIFIED: Registration.State
    STATE_SUBMITTED: Registration.State
    STATE_DOCUMENTS_PENDING: Registration.State
    STATE_IN_REVIEW: Registration.State
    STATE_APPROVED: Registration.State
    STATE_DENIED: Registration.State
    STATE_EXPIRED: Registration.State
    class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DECISION_UNSPECIFIED: _ClassVar[Registration.Decision]
        DECISION_APPROVE: _ClassVar[Registration.Decision]
        DECISION_DENY: _ClassVar[Registration.Decision]
    DECISION_UNSPECIFIED: Registration.Decision
    DECISION_APPROVE: Registration.Decision
    DECISION_DENY: Registration.Decision
    class AnswersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: FieldValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[FieldValue, _Mapping]] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    FORM_ID_FIELD_NUMBER: _ClassVar[int]
    FORM_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INVITATION_CODE_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_GROUP_FIELD_NUMBER: _ClassVar[int]
    REQUIREMENTS_FIELD_NUMBER: _ClassVar[int]
    REQUIREMENT_STATUS_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    DECISION_NOTE_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    channel: str
    form_id: str
    form_version: int
    state: Registration.State
    answers: _containers.MessageMap[str, FieldValue]
    address: _types_pb2.PostalAddress
    invitation_code: str
    customer_group: str
    requirements: RequirementGroup
    requirement_status: RequirementStatus
    account: Account
    documents: _containers.RepeatedCompositeFieldContainer[RegistrationDocument]
    signatures: _containers.RepeatedCompositeFieldContainer[AgreementSignature]
    history: _containers.RepeatedCompositeFieldContainer[RegistrationEvent]
    decision: Registration.Decision
    decision_note: str
    reviewer: str
    expire_time: _timestamp_pb2.Timestamp
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., channel: _Optional[str] = ..., form_id: _Optional[str] = ..., form_version: _Optional[int] = ..., state: _Optional[_Union[Registration.State, str]] = ..., answers: _Optional[_Mapping[str, FieldValue]] = ..., address: _Optional[_Union[_types_pb2.PostalAddress, _Mapping]] = ..., invitation_code: _Optional[str] = ..., customer_group: _Optional[str] = ..., requirements: _Optional[_Union[RequirementGroup, _Mapping]] = ..., requirement_status: _Optional[_Union[RequirementStatus, _Mapping]] = ..., account: _Optional[_Union[Account, _Mapping]] = ..., documents: _Optional[_Iterable[_Union[RegistrationDocument, _Mapping]]] = ..., signatures: _Optional[_Iterable[_Union[AgreementSignature, _Mapping]]] = ..., history: _Optional[_Iterable[_Union[RegistrationEvent, _Mapping]]] = ..., decision: _Optional[_Union[Registration.Decision, str]] = ..., decision_note: _Optional[str] = ..., reviewer: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SubmitRegistrationRequest(_message.Message):
    __slots__ = ("form", "answers", "address", "invitation_code", "request_id", "commerce_mode")
    class AnswersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: FieldValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[FieldValue, _Mapping]] = ...) -> None: ...
    FORM_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INVITATION_CODE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    COMMERCE_MODE_FIELD_NUMBER: _ClassVar[int]
    form: str
    answers: _containers.MessageMap[str, FieldValue]
    address: _types_pb2.PostalAddress
    invitation_code: str
    request_id: str
    commerce_mode: CommerceMode
    def __init__(self, form: _Optional[str] = ..., answers: _Optional[_Mapping[str, FieldValue]] = ..., address: _Optional[_Union[_types_pb2.PostalAddress, _Mapping]] = ..., invitation_code: _Optional[str] = ..., request_id: _Optional[str] = ..., commerce_mode: _Optional[_Union[CommerceMode, str]] = ...) -> None: ...

class UploadRegistrationDocumentRequest(_message.Message):
    __slots__ = ("header", "chunk")
    class Header(_message.Message):
        __slots__ = ("registration_id", "document_type_code", "filename", "content_type", "number", "issuing_authority", "expiration_date", "request_id")
        REGISTRATION_ID_FIELD_NUMBER: _ClassVar[int]
        DOCUMENT_TYPE_CODE_FIELD_NUMBER: _ClassVar[int]
        FILENAME_FIELD_NUMBER: _ClassVar[int]
        CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
        NUMBER_FIELD_NUMBER: _ClassVar[int]
        ISSUING_AUTHORITY_FIELD_NUMBER: _ClassVar[int]
        EXPIRATION_DATE_FIELD_NUMBER: _ClassVar[int]
        REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
        registration_id: str
        document_type_code: str
        filename: str
        content_type: str
        number: str
        issuing_authority: str
        expiration_date: str
        request_id: str
        def __init__(self, registration_id: _Optional[str] = ..., document_type_code: _Optional[str] = ..., filename: _Optional[str] = ..., content_type: _Optional[str] = ..., number: _Optional[str] = ..., issuing_authority: _Optional[str] = ..., expiration_date: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadRegistrationDocumentRequest.Header
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UploadRegistrationDocumentRequest.Header, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class SignAgreementRequest(_message.Message):
    __slots__ = ("registration_id", "agreement_code", "agreement_version", "method", "signer_name", "signer_email", "signature", "external_reference", "request_id")
    REGISTRATION_ID_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_CODE_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SIGNER_NAME_FIELD_NUMBER: _ClassVar[int]
    SIGNER_EMAIL_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    registration_id: str
    agreement_code: str
    agreement_version: int
    method: SignatureMethod
    signer_name: str
    signer_email: str
    signature: bytes
    external_reference: str
    request_id: str
    def __init__(self, registration_id: _Optional[str] = ..., agreement_code: _Optional[str] = ..., agreement_version: _Optional[int] = ..., method: _Optional[_Union[SignatureMethod, str]] = ..., signer_name: _Optional[str] = ..., signer_email: _Optional[str] = ..., signature: _Optional[bytes] = ..., external_reference: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ReviewRegistrationRequest(_message.Message):
    __slots__ = ("registration_id", "decision", "note", "request_id")
    REGISTRATION_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    registration_id: str
    decision: Registration.Decision
    note: str
    request_id: str
    def __init__(self, registration_id: _Optional[str] = ..., decision: _Optional[_Union[Registration.Decision, str]] = ..., note: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetRegistrationRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListRegistrationsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "states", "form_id")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    FORM_ID_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    states: _containers.RepeatedScalarFieldContainer[Registration.State]
    form_id: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., states: _Optional[_Iterable[_Union[Registration.State, str]]] = ..., form_id: _Optional[str] = ...) -> None: ...

class ListRegistrationsResponse(_message.Message):
    __slots__ = ("registrations", "next_page_token")
    REGISTRATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    registrations: _containers.RepeatedCompositeFieldContainer[Registration]
    next_page_token: str
    def __init__(self, registrations: _Optional[_Iterable[_Union[Registration, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
