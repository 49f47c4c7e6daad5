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

class Cart(_message.Message):
    __slots__ = ("id", "channel", "customer_ref", "version", "state", "lines", "subtotal", "item_count", "approval_required", "hold", "approval", "order_id", "created_by", "create_time", "update_time")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Cart.State]
        STATE_ACTIVE: _ClassVar[Cart.State]
        STATE_PENDING_APPROVAL: _ClassVar[Cart.State]
        STATE_APPROVED: _ClassVar[Cart.State]
        STATE_APPROVED_BLOCKED_INVENTORY: _ClassVar[Cart.State]
        STATE_REJECTED: _ClassVar[Cart.State]
        STATE_CONVERTED: _ClassVar[Cart.State]
    STATE_UNSPECIFIED: Cart.State
    STATE_ACTIVE: Cart.State
    STATE_PENDING_APPROVAL: Cart.State
    STATE_APPROVED: Cart.State
    STATE_APPROVED_BLOCKED_INVENTORY: Cart.State
    STATE_REJECTED: Cart.State
    STATE_CONVERTED: Cart.State
    ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_REF_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    SUBTOTAL_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    HOLD_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    channel: str
    customer_ref: str
    version: int
    state: Cart.State
    lines: _containers.RepeatedCompositeFieldContainer[CartLine]
    subtotal: _types_pb2.Money
    item_count: int
    approval_required: bool
    hold: StockHold
    approval: Approval
    order_id: str
    created_by: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., channel: _Optional[str] = ..., customer_ref: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[Cart.State, str]] = ..., lines: _Optional[_Iterable[_Union[CartLine, _Mapping]]] = ..., subtotal: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., item_count: _Optional[int] = ..., approval_required: _Optional[bool] = ..., hold: _Optional[_Union[StockHold, _Mapping]] = ..., approval: _Optional[_Union[Approval, _Mapping]] = ..., order_id: _Optional[str] = ..., created_by: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CartLine(_message.Message):
    __slots__ = ("line_id", "sku", "quantity", "unit_price", "line_total")
    LINE_ID_FIELD_NUMBER: _ClassVar[int]
    SKU_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    UNIT_PRICE_FIELD_NUMBER: _ClassVar[int]
    LINE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    line_id: str
    sku: str
    quantity: int
    unit_price: _types_pb2.Money
    line_total: _types_pb2.Money
    def __init__(self, line_id: _Optional[str] = ..., sku: _Optional[str] = ..., quantity: _Optional[int] = ..., unit_price: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., line_total: _Optional[_Union[_types_pb2.Money, _Mapping]] = ...) -> None: ...

class StockHold(_message.Message):
    __slots__ = ("state", "reservation_id", "expire_time", "ttl")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[StockHold.State]
        STATE_NONE: _ClassVar[StockHold.State]
        STATE_HELD: _ClassVar[StockHold.State]
        STATE_EXPIRED: _ClassVar[StockHold.State]
        STATE_RELEASED: _ClassVar[StockHold.State]
    STATE_UNSPECIFIED: StockHold.State
    STATE_NONE: StockHold.State
    STATE_HELD: StockHold.State
    STATE_EXPIRED: StockHold.State
    STATE_RELEASED: StockHold.State
    STATE_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    state: StockHold.State
    reservation_id: str
    expire_time: _timestamp_pb2.Timestamp
    ttl: _duration_pb2.Duration
    def __init__(self, state: _Optional[_Union[StockHold.State, str]] = ..., reservation_id: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Approval(_message.Message):
    __slots__ = ("submitted_by", "submit_time", "submit_note", "decision", "decided_by", "decide_time", "reason", "shortages", "approved_grand_total", "approved_lines", "stale")
    class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DECISION_UNSPECIFIED: _ClassVar[Approval.Decision]
        DECISION_APPROVE: _ClassVar[Approval.Decision]
        DECISION_REJECT: _ClassVar[Approval.Decision]
    DECISION_UNSPECIFIED: Approval.Decision
    DECISION_APPROVE: Approval.Decision
    DECISION_REJECT: Approval.Decision
    SUBMITTED_BY_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_TIME_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_NOTE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    DECIDE_TIME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SHORTAGES_FIELD_NUMBER: _ClassVar[int]
    APPROVED_GRAND_TOTAL_FIELD_NUMBER: _ClassVar[int]
    APPROVED_LINES_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    submitted_by: str
    submit_time: _timestamp_pb2.Timestamp
    submit_note: str
    decision: Approval.Decision
    decided_by: str
    decide_time: _timestamp_pb2.Timestamp
    reason: str
    shortages: _containers.RepeatedCompositeFieldContainer[StockShortage]
    approved_grand_total: _types_pb2.Money
    approved_lines: _containers.RepeatedCompositeFieldContainer[ApprovedLine]
    stale: bool
    def __init__(self, submitted_by: _Optional[str] = ..., submit_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., submit_note: _Optional[str] = ..., decision: _Optional[_Union[Approval.Decision, str]] = ..., decided_by: _Optional[str] = ..., decide_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ..., shortages: _Optional[_Iterable[_Union[StockShortage, _Mapping]]] = ..., approved_grand_total: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., approved_lines: _Optional[_Iterable[_Union[ApprovedLine, _Mapping]]] = ..., stale: _Optional[bool] = ...) -> None: ...

class ApprovedLine(_message.Message):
    __slots__ = ("line_id", "sku", "quantity", "unit_price")
    LINE_ID_FIELD_NUMBER: _ClassVar[int]
    SKU_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    UNIT_PRICE_FIELD_NUMBER: _ClassVar[int]
    line_id: str
    sku: str
    quantity: int
    unit_price: _types_pb2.Money
    def __init__(self, line_id: _Optional[str] = ..., sku: _Optional[str] = ..., quantity: _Optional[int] = ..., unit_price: _Optional[_Union[_types_pb2.Money, _Mapping]] = ...) -> None: ...

class StockShortage(_message.Message):
    __slots__ = ("sku", "description")
    SKU_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    sku: str
    description: str
    def __init__(self, sku: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class PurchaseLimit(_message.Message):
    __slots__ = ("sku", "channel", "min_quantity", "order_multiple", "max_per_order", "max_per_customer", "update_time")
    SKU_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    MIN_QUANTITY_FIELD_NUMBER: _ClassVar[int]
    ORDER_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    MAX_PER_ORDER_FIELD_NUMBER: _ClassVar[int]
    MAX_PER_CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    sku: str
    channel: str
    min_quantity: int
    order_multiple: int
    max_per_order: int
    max_per_customer: int
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, sku: _Optional[str] = ..., channel: _Optional[str] = ..., min_quantity: _Optional[int] = ..., order_multiple: _Optional[int] = ..., max_per_order: _Optional[int] = ..., max_per_customer: _Optional[int] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateCartRequest(_message.Message):
    __slots__ = ("cart", "request_id")
    CART_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    cart: Cart
    request_id: str
    def __init__(self, cart: _Optional[_Union[Cart, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetCartRequest(_message.Message):
    __slots__ = ("cart_id",)
    CART_ID_FIELD_NUMBER: _ClassVar[int]
    cart_id: str
    def __init__(self, cart_id: _Optional[str] = ...) -> None: ...

class ListCartsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "customer_ref", "state")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_REF_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    customer_ref: str
    state: Cart.State
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., customer_ref: _Optional[str] = ..., state: _Optional[_Union[Cart.State, str]] = ...) -> None: ...

class ListCartsResponse(_message.Message):
    __slots__ = ("carts", "next_page_token")
    CARTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    carts: _containers.RepeatedCompositeFieldContainer[Cart]
    next_page_token: str
    def __init__(self, carts: _Optional[_Iterable[_Union[Cart, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class AddCartLineRequest(_message.Message):
    __slots__ = ("cart_id", "version", "line", "request_id")
    CART_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    cart_id: str
    version: int
    line: CartLine
    request_id: str
    def __init__(self, cart_id: _Optional[str] = ..., version: _Optional[int] = ..., line: _Optional[_Union[CartLine, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class UpdateCartLineRequest(_message.Message):
    __slots__ = ("cart_id", "version", "line", "update_mask", "request_id")
    CART_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    cart_id: str
    version: int
    line: CartLine
    update_mask: _field_mask_pb2.FieldMask
    request_id: str
    def __init__(self, cart_id: _Optional[str] = ..., version: _Optional[int] = ..., line: _Optional[_Union[CartLine, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class RemoveCartLineRequest(_message.Message):
    __slots__ = ("cart_id", "version", "line_id", "request_id")
    CART_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LINE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    cart_id: str
    version: int
    line_id: str
    request_id: str
    def __init__(self, cart_id: _Optional[str] = ..., version: _Optional[int] = ..., line_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class HoldCartStockRequest(_message.Message):
    __slots__ = ("cart_id", "version", "ttl", "request_id")
    CART_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    cart_id: str
    version: int
    ttl: _duration_pb2.Duration
    request_id: str
    def __init__(self, cart_id: _Optional[str] = ..., version: _Optional[int] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ReleaseCartHoldRequest(_message.Message):
    __slots__ = ("cart_id", "version", "request_id")
    CART_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    cart_id: str
    version: int
    request_id: str
    def __init__(self, cart_id: _Optional[str] = ..., version: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class SetPurchaseLimitRequest(_message.Message):
    __slots__ = ("limit", "request_id")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    limit: PurchaseLimit
    request_id: str
    def __init__(self, limit: _Optional[_Union[PurchaseLimit, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetPurchaseLimitRequest(_message.Message):
    __slots__ = ("sku",)
    SKU_FIELD_NUMBER: _ClassVar[int]
    sku: str
    def __init__(self, sku: _Optional[str] = ...) -> None: ...

class SubmitCartForApprovalRequest(_message.Message):
    __slots__ = ("cart_id", "version", "note", "request_id")
    CART_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    cart_id: str
    version: int
    note: str
    request_id: str
    def __init__(self, cart_id: _Optional[str] = ..., version: _Optional[int] = ..., note: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class DecideCartApprovalRequest(_message.Message):
    __slots__ = ("cart_id", "version", "decision", "reason", "request_id")
    CART_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    cart_id: str
    version: int
    decision: Approval.Decision
    reason: str
    request_id: str
    def __init__(self, cart_id: _Optional[str] = ..., version: _Optional[int] = ..., decision: _Optional[_Union[Approval.Decision, str]] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class CheckoutPayment(_message.Message):
    __slots__ = ("tender_id", "method", "captured", "gateway_reference")
    TENDER_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    tender_id: str
    method: str
    captured: _types_pb2.Money
    gateway_reference: str
    def __init__(self, tender_id: _Optional[str] = ..., method: _Optional[str] = ..., captured: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., gateway_reference: _Optional[str] = ...) -> None: ...

class CheckoutCartRequest(_message.Message):
    __slots__ = ("cart_id", "version", "tax", "shipping", "discount", "payments", "external_order_id", "request_id")
    CART_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TAX_FIELD_NUMBER: _ClassVar[int]
    SHIPPING_FIELD_NUMBER: _ClassVar[int]
    DISCOUNT_FIELD_NUMBER: _ClassVar[int]
    PAYMENTS_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    cart_id: str
    version: int
    tax: _types_pb2.Money
    shipping: _types_pb2.Money
    discount: _types_pb2.Money
    payments: _containers.RepeatedCompositeFieldContainer[CheckoutPayment]
    external_order_id: str
    request_id: str
    def __init__(self, cart_id: _Optional[str] = ..., version: _Optional[int] = ..., tax: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., shipping: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., discount: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., payments: _Optional[_Iterable[_Union[CheckoutPayment, _Mapping]]] = ..., external_order_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class CheckoutCartResponse(_message.Message):
    __slots__ = ("cart", "order_id", "reservation_id")
    CART_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    cart: Cart
    order_id: str
    reservation_id: str
    def __init__(self, cart: _Optional[_Union[Cart, _Mapping]] = ..., order_id: _Optional[str] = ..., reservation_id: _Optional[str] = ...) -> None: ...
