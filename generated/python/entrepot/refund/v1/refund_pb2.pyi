import datetime

from entrepot.auth.v1 import auth_pb2 as _auth_pb2
from entrepot.platform.v1 import types_pb2 as _types_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Refund(_message.Message):
    __slots__ = ("refund_id", "order_id", "channel", "state", "lines", "amount", "reason", "restock", "restock_warehouse_code", "tenders", "requested_by", "decided_by", "decision_note", "execution_attempt", "workflow_id", "fault_message", "create_time", "decide_time", "complete_time")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Refund.State]
        STATE_PENDING_APPROVAL: _ClassVar[Refund.State]
        STATE_DENIED: _ClassVar[Refund.State]
        STATE_EXECUTING: _ClassVar[Refund.State]
        STATE_COMPLETED: _ClassVar[Refund.State]
        STATE_FAULTED: _ClassVar[Refund.State]
    STATE_UNSPECIFIED: Refund.State
    STATE_PENDING_APPROVAL: Refund.State
    STATE_DENIED: Refund.State
    STATE_EXECUTING: Refund.State
    STATE_COMPLETED: Refund.State
    STATE_FAULTED: Refund.State
    REFUND_ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RESTOCK_FIELD_NUMBER: _ClassVar[int]
    RESTOCK_WAREHOUSE_CODE_FIELD_NUMBER: _ClassVar[int]
    TENDERS_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    DECISION_NOTE_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    FAULT_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    DECIDE_TIME_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_TIME_FIELD_NUMBER: _ClassVar[int]
    refund_id: str
    order_id: str
    channel: str
    state: Refund.State
    lines: _containers.RepeatedCompositeFieldContainer[RefundLine]
    amount: _types_pb2.Money
    reason: str
    restock: bool
    restock_warehouse_code: str
    tenders: _containers.RepeatedCompositeFieldContainer[RefundTender]
    requested_by: str
    decided_by: str
    decision_note: str
    execution_attempt: int
    workflow_id: str
    fault_message: str
    create_time: _timestamp_pb2.Timestamp
    decide_time: _timestamp_pb2.Timestamp
    complete_time: _timestamp_pb2.Timestamp
    def __init__(self, refund_id: _Optional[str] = ..., order_id: _Optional[str] = ..., channel: _Optional[str] = ..., state: _Optional[_Union[Refund.State, str]] = ..., lines: _Optional[_Iterable[_Union[RefundLine, _Mapping]]] = ..., amount: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., reason: _Optional[str] = ..., restock: _Optional[bool] = ..., restock_warehouse_code: _Optional[str] = ..., tenders: _Optional[_Iterable[_Union[RefundTender, _Mapping]]] = ..., requested_by: _Optional[str] = ..., decided_by: _Optional[str] = ..., decision_note: _Optional[str] = ..., execution_attempt: _Optional[int] = ..., workflow_id: _Optional[str] = ..., fault_message: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., decide_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., complete_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RefundLine(_message.Message):
    __slots__ = ("line_id", "sku", "quantity", "amount")
    LINE_ID_FIELD_NUMBER: _ClassVar[int]
    SKU_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    line_id: str
    sku: str
    quantity: int
    amount: _types_pb2.Money
    def __init__(self, line_id: _Optional[str] = ..., sku: _Optional[str] = ..., quantity: _Optional[int] = ..., amount: _Optional[_Union[_types_pb2.Money, _Mapping]] = ...) -> None: ...

class RefundTender(_message.Message):
    __slots__ = ("tender_id", "method", "amount", "state", "idempotency_key", "gateway_refund_id", "attempts", "refund_time")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[RefundTender.State]
        STATE_PENDING: _ClassVar[RefundTender.State]
        STATE_SUCCEEDED: _ClassVar[RefundTender.State]
    STATE_UNSPECIFIED: RefundTender.State
    STATE_PENDING: RefundTender.State
    STATE_SUCCEEDED: RefundTender.State
    TENDER_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_REFUND_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    REFUND_TIME_FIELD_NUMBER: _ClassVar[int]
    tender_id: str
    method: str
    amount: _types_pb2.Money
    state: RefundTender.State
    idempotency_key: str
    gateway_refund_id: str
    attempts: int
    refund_time: _timestamp_pb2.Timestamp
    def __init__(self, tender_id: _Optional[str] = ..., method: _Optional[str] = ..., amount: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., state: _Optional[_Union[RefundTender.State, str]] = ..., idempotency_key: _Optional[str] = ..., gateway_refund_id: _Optional[str] = ..., attempts: _Optional[int] = ..., refund_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RefundLineInput(_message.Message):
    __slots__ = ("line_id", "quantity")
    LINE_ID_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    line_id: str
    quantity: int
    def __init__(self, line_id: _Optional[str] = ..., quantity: _Optional[int] = ...) -> None: ...

class SubmitRefundForApprovalRequest(_message.Message):
    __slots__ = ("order_id", "lines", "amount", "reason", "restock", "restock_warehouse_code", "request_id")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RESTOCK_FIELD_NUMBER: _ClassVar[int]
    RESTOCK_WAREHOUSE_CODE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    lines: _containers.RepeatedCompositeFieldContainer[RefundLineInput]
    amount: _types_pb2.Money
    reason: str
    restock: bool
    restock_warehouse_code: str
    request_id: str
    def __init__(self, order_id: _Optional[str] = ..., lines: _Optional[_Iterable[_Union[RefundLineInput, _Mapping]]] = ..., amount: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., reason: _Optional[str] = ..., restock: _Optional[bool] = ..., restock_warehouse_code: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class DecideRefundApprovalRequest(_message.Message):
    __slots__ = ("refund_id", "decision", "note", "request_id")
    class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DECISION_UNSPECIFIED: _ClassVar[DecideRefundApprovalRequest.Decision]
        DECISION_APPROVE: _ClassVar[DecideRefundApprovalRequest.Decision]
        DECISION_DENY: _ClassVar[DecideRefundApprovalRequest.Decision]
    DECISION_UNSPECIFIED: DecideRefundApprovalRequest.Decision
    DECISION_APPROVE: DecideRefundApprovalRequest.Decision
    DECISION_DENY: DecideRefundApprovalRequest.Decision
    REFUND_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    refund_id: str
    decision: DecideRefundApprovalRequest.Decision
    note: str
    request_id: str
    def __init__(self, refund_id: _Optional[str] = ..., decision: _Optional[_Union[DecideRefundApprovalRequest.Decision, str]] = ..., note: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class RetryRefundExecutionRequest(_message.Message):
    __slots__ = ("refund_id", "request_id")
    REFUND_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    refund_id: str
    request_id: str
    def __init__(self, refund_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetRefundRequest(_message.Message):
    __slots__ = ("refund_id",)
    REFUND_ID_FIELD_NUMBER: _ClassVar[int]
    refund_id: str
    def __init__(self, refund_id: _Optional[str] = ...) -> None: ...

class ListRefundRequestsRequest(_message.Message):
    __slots__ = ("states", "order_id", "page_size", "page_token")
    STATES_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[Refund.State]
    order_id: str
    page_size: int
    page_token: str
    def __init__(self, states: _Optional[_Iterable[_Union[Refund.State, str]]] = ..., order_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRefundRequestsResponse(_message.Message):
    __slots__ = ("refunds", "next_page_token")
    REFUNDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    refunds: _containers.RepeatedCompositeFieldContainer[Refund]
    next_page_token: str
    def __init__(self, refunds: _Optional[_Iterable[_Union[Refund, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WorkflowFault(_message.Message):
    __slots__ = ("fault_id", "workflow_id", "subject_type", "subject_id", "step", "error_type", "message", "create_time", "resolve_time")
    FAULT_ID_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    RESOLVE_TIME_FIELD_NUMBER: _ClassVar[int]
    fault_id: int
    workflow_id: str
    subject_type: str
    subject_id: str
    step: str
    error_type: str
    message: str
    create_time: _timestamp_pb2.Timestamp
    resolve_time: _timestamp_pb2.Timestamp
    def __init__(self, fault_id: _Optional[int] = ..., workflow_id: _Optional[str] = ..., subject_type: _Optional[str] = ..., subject_id: _Optional[str] = ..., step: _Optional[str] = ..., error_type: _Optional[str] = ..., message: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., resolve_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListWorkflowFaultsRequest(_message.Message):
    __slots__ = ("refund_id", "include_resolved", "page_size", "page_token")
    REFUND_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_RESOLVED_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    refund_id: str
    include_resolved: bool
    page_size: int
    page_token: str
    def __init__(self, refund_id: _Optional[str] = ..., include_resolved: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListWorkflowFaultsResponse(_message.Message):
    __slots__ = ("faults", "next_page_token")
    FAULTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    faults: _containers.RepeatedCompositeFieldContainer[WorkflowFault]
    next_page_token: str
    def __init__(self, faults: _Optional[_Iterable[_Union[WorkflowFault, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
