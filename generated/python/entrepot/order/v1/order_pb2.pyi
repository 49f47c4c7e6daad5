import datetime

from entrepot.auth.v1 import auth_pb2 as _auth_pb2
from entrepot.platform.v1 import types_pb2 as _types_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Severity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEVERITY_UNSPECIFIED: _ClassVar[Severity]
    SEVERITY_INFO: _ClassVar[Severity]
    SEVERITY_WARNING: _ClassVar[Severity]
    SEVERITY_BLOCKING: _ClassVar[Severity]

class OrderEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ORDER_EVENT_TYPE_UNSPECIFIED: _ClassVar[OrderEventType]
    ORDER_EVENT_TYPE_CREATED: _ClassVar[OrderEventType]
    ORDER_EVENT_TYPE_TRANSITIONED: _ClassVar[OrderEventType]
    ORDER_EVENT_TYPE_STATUS_APPENDED: _ClassVar[OrderEventType]
    ORDER_EVENT_TYPE_STATUS_CLOSED: _ClassVar[OrderEventType]
SEVERITY_UNSPECIFIED: Severity
SEVERITY_INFO: Severity
SEVERITY_WARNING: Severity
SEVERITY_BLOCKING: Severity
ORDER_EVENT_TYPE_UNSPECIFIED: OrderEventType
ORDER_EVENT_TYPE_CREATED: OrderEventType
ORDER_EVENT_TYPE_TRANSITIONED: OrderEventType
ORDER_EVENT_TYPE_STATUS_APPENDED: OrderEventType
ORDER_EVENT_TYPE_STATUS_CLOSED: OrderEventType

class OrderLine(_message.Message):
    __slots__ = ("line_id", "sku", "quantity", "unit_price", "line_total", "shipped_quantity", "refunded_quantity")
    LINE_ID_FIELD_NUMBER: _ClassVar[int]
    SKU_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    UNIT_PRICE_FIELD_NUMBER: _ClassVar[int]
    LINE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SHIPPED_QUANTITY_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_QUANTITY_FIELD_NUMBER: _ClassVar[int]
    line_id: str
    sku: str
    quantity: int
    unit_price: _types_pb2.Money
    line_total: _types_pb2.Money
    shipped_quantity: int
    refunded_quantity: int
    def __init__(self, line_id: _Optional[str] = ..., sku: _Optional[str] = ..., quantity: _Optional[int] = ..., unit_price: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., line_total: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., shipped_quantity: _Optional[int] = ..., refunded_quantity: _Optional[int] = ...) -> None: ...

class OrderTotals(_message.Message):
    __slots__ = ("subtotal", "tax", "shipping", "discount", "grand_total")
    SUBTOTAL_FIELD_NUMBER: _ClassVar[int]
    TAX_FIELD_NUMBER: _ClassVar[int]
    SHIPPING_FIELD_NUMBER: _ClassVar[int]
    DISCOUNT_FIELD_NUMBER: _ClassVar[int]
    GRAND_TOTAL_FIELD_NUMBER: _ClassVar[int]
    subtotal: _types_pb2.Money
    tax: _types_pb2.Money
    shipping: _types_pb2.Money
    discount: _types_pb2.Money
    grand_total: _types_pb2.Money
    def __init__(self, subtotal: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., tax: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., shipping: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., discount: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., grand_total: _Optional[_Union[_types_pb2.Money, _Mapping]] = ...) -> None: ...

class Payment(_message.Message):
    __slots__ = ("tender_id", "method", "captured", "gateway_reference", "refunded")
    TENDER_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_FIELD_NUMBER: _ClassVar[int]
    tender_id: str
    method: str
    captured: _types_pb2.Money
    gateway_reference: str
    refunded: _types_pb2.Money
    def __init__(self, tender_id: _Optional[str] = ..., method: _Optional[str] = ..., captured: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., gateway_reference: _Optional[str] = ..., refunded: _Optional[_Union[_types_pb2.Money, _Mapping]] = ...) -> None: ...

class OrderIntent(_message.Message):
    __slots__ = ("intent_id", "source_system", "external_order_id", "customer_ref", "lines", "totals", "payments", "submit_time")
    INTENT_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SYSTEM_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_REF_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    PAYMENTS_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_TIME_FIELD_NUMBER: _ClassVar[int]
    intent_id: str
    source_system: str
    external_order_id: str
    customer_ref: str
    lines: _containers.RepeatedCompositeFieldContainer[OrderLine]
    totals: OrderTotals
    payments: _containers.RepeatedCompositeFieldContainer[Payment]
    submit_time: _timestamp_pb2.Timestamp
    def __init__(self, intent_id: _Optional[str] = ..., source_system: _Optional[str] = ..., external_order_id: _Optional[str] = ..., customer_ref: _Optional[str] = ..., lines: _Optional[_Iterable[_Union[OrderLine, _Mapping]]] = ..., totals: _Optional[_Union[OrderTotals, _Mapping]] = ..., payments: _Optional[_Iterable[_Union[Payment, _Mapping]]] = ..., submit_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Order(_message.Message):
    __slots__ = ("id", "channel", "source_system", "intent_id", "external_order_id", "customer_ref", "state", "lines", "totals", "payments", "submit_time", "create_time", "update_time", "reservation_id", "blocked", "reissue", "reissued_from_order_id", "reissue_reason", "reissue_order_ids", "external_handoff_reference", "external_handoff_acknowledge_time", "inventory_risk")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Order.State]
        STATE_PENDING: _ClassVar[Order.State]
        STATE_PROCESSING: _ClassVar[Order.State]
        STATE_PARTIALLY_SHIPPED: _ClassVar[Order.State]
        STATE_SHIPPED: _ClassVar[Order.State]
        STATE_DELIVERED: _ClassVar[Order.State]
        STATE_CANCELLED: _ClassVar[Order.State]
    STATE_UNSPECIFIED: Order.State
    STATE_PENDING: Order.State
    STATE_PROCESSING: Order.State
    STATE_PARTIALLY_SHIPPED: Order.State
    STATE_SHIPPED: Order.State
    STATE_DELIVERED: Order.State
    STATE_CANCELLED: Order.State
    ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SYSTEM_FIELD_NUMBER: _ClassVar[int]
    INTENT_ID_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_REF_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    PAYMENTS_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_TIME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_FIELD_NUMBER: _ClassVar[int]
    REISSUE_FIELD_NUMBER: _ClassVar[int]
    REISSUED_FROM_ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    REISSUE_REASON_FIELD_NUMBER: _ClassVar[int]
    REISSUE_ORDER_IDS_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_HANDOFF_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_HANDOFF_ACKNOWLEDGE_TIME_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_RISK_FIELD_NUMBER: _ClassVar[int]
    id: str
    channel: str
    source_system: str
    intent_id: str
    external_order_id: str
    customer_ref: str
    state: Order.State
    lines: _containers.RepeatedCompositeFieldContainer[OrderLine]
    totals: OrderTotals
    payments: _containers.RepeatedCompositeFieldContainer[Payment]
    submit_time: _timestamp_pb2.Timestamp
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    reservation_id: str
    blocked: bool
    reissue: bool
    reissued_from_order_id: str
    reissue_reason: str
    reissue_order_ids: _containers.RepeatedScalarFieldContainer[str]
    external_handoff_reference: str
    external_handoff_acknowledge_time: _timestamp_pb2.Timestamp
    inventory_risk: bool
    def __init__(self, id: _Optional[str] = ..., channel: _Optional[str] = ..., source_system: _Optional[str] = ..., intent_id: _Optional[str] = ..., external_order_id: _Optional[str] = ..., customer_ref: _Optional[str] = ..., state: _Optional[_Union[Order.State, str]] = ..., lines: _Optional[_Iterable[_Union[OrderLine, _Mapping]]] = ..., totals: _Optional[_Union[OrderTotals, _Mapping]] = ..., payments: _Optional[_Iterable[_Union[Payment, _Mapping]]] = ..., submit_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reservation_id: _Optional[str] = ..., blocked: _Optional[bool] = ..., reissue: _Optional[bool] = ..., reissued_from_order_id: _Optional[str] = ..., reissue_reason: _Optional[str] = ..., reissue_order_ids: _Optional[_Iterable[str]] = ..., external_handoff_reference: _Optional[str] = ..., external_handoff_acknowledge_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., inventory_risk: _Optional[bool] = ...) -> None: ...

class SubmitOrderIntentRequest(_message.Message):
    __slots__ = ("intent", "reserve_inventory", "request_id")
    INTENT_FIELD_NUMBER: _ClassVar[int]
    RESERVE_INVENTORY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    intent: OrderIntent
    reserve_inventory: bool
    request_id: str
    def __init__(self, intent: _Optional[_Union[OrderIntent, _Mapping]] = ..., reserve_inventory: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class SubmitOrderIntentResponse(_message.Message):
    __slots__ = ("order", "created")
    ORDER_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    order: Order
    created: bool
    def __init__(self, order: _Optional[_Union[Order, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetOrderRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetOrderByExternalIdRequest(_message.Message):
    __slots__ = ("source_system", "external_order_id")
    SOURCE_SYSTEM_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    source_system: str
    external_order_id: str
    def __init__(self, source_system: _Optional[str] = ..., external_order_id: _Optional[str] = ...) -> None: ...

class ListOrdersRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "states", "customer_ref", "source_system", "start_time", "end_time", "blocked_only", "inventory_risk_only", "handoff_unacknowledged_for")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_REF_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SYSTEM_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_ONLY_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_RISK_ONLY_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_UNACKNOWLEDGED_FOR_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    states: _containers.RepeatedScalarFieldContainer[Order.State]
    customer_ref: str
    source_system: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    blocked_only: bool
    inventory_risk_only: bool
    handoff_unacknowledged_for: _duration_pb2.Duration
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., states: _Optional[_Iterable[_Union[Order.State, str]]] = ..., customer_ref: _Optional[str] = ..., source_system: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., blocked_only: _Optional[bool] = ..., inventory_risk_only: _Optional[bool] = ..., handoff_unacknowledged_for: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ListOrdersResponse(_message.Message):
    __slots__ = ("orders", "next_page_token")
    ORDERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    orders: _containers.RepeatedCompositeFieldContainer[Order]
    next_page_token: str
    def __init__(self, orders: _Optional[_Iterable[_Union[Order, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class OrderStatusEntry(_message.Message):
    __slots__ = ("id", "order_id", "code", "module", "category", "severity", "payload_json", "record_time", "written_by", "create_time", "close_time", "closed_by", "close_note", "open")
    ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    RECORD_TIME_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_BY_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    CLOSE_TIME_FIELD_NUMBER: _ClassVar[int]
    CLOSED_BY_FIELD_NUMBER: _ClassVar[int]
    CLOSE_NOTE_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    id: int
    order_id: str
    code: str
    module: str
    category: str
    severity: Severity
    payload_json: str
    record_time: _timestamp_pb2.Timestamp
    written_by: str
    create_time: _timestamp_pb2.Timestamp
    close_time: _timestamp_pb2.Timestamp
    closed_by: str
    close_note: str
    open: bool
    def __init__(self, id: _Optional[int] = ..., order_id: _Optional[str] = ..., code: _Optional[str] = ..., module: _Optional[str] = ..., category: _Optional[str] = ..., severity: _Optional[_Union[Severity, str]] = ..., payload_json: _Optional[str] = ..., record_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., written_by: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., close_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., closed_by: _Optional[str] = ..., close_note: _Optional[str] = ..., open: _Optional[bool] = ...) -> None: ...

class AppendOrderStatusRequest(_message.Message):
    __slots__ = ("entry", "request_id")
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    entry: OrderStatusEntry
    request_id: str
    def __init__(self, entry: _Optional[_Union[OrderStatusEntry, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CloseOrderStatusRequest(_message.Message):
    __slots__ = ("order_id", "entry_id", "note", "request_id")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    entry_id: int
    note: str
    request_id: str
    def __init__(self, order_id: _Optional[str] = ..., entry_id: _Optional[int] = ..., note: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ListOrderStatusHistoryRequest(_message.Message):
    __slots__ = ("order_id", "page_size", "page_token", "module")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    page_size: int
    page_token: str
    module: str
    def __init__(self, order_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., module: _Optional[str] = ...) -> None: ...

class ListOrderStatusHistoryResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[OrderStatusEntry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[OrderStatusEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetOrderStatusSummaryRequest(_message.Message):
    __slots__ = ("order_id",)
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    def __init__(self, order_id: _Optional[str] = ...) -> None: ...

class OrderStatusSummary(_message.Message):
    __slots__ = ("order_id", "state", "latest_by_module", "open_blocking", "inventory_risk")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LATEST_BY_MODULE_FIELD_NUMBER: _ClassVar[int]
    OPEN_BLOCKING_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_RISK_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    state: Order.State
    latest_by_module: _containers.RepeatedCompositeFieldContainer[OrderStatusEntry]
    open_blocking: _containers.RepeatedCompositeFieldContainer[OrderStatusEntry]
    inventory_risk: bool
    def __init__(self, order_id: _Optional[str] = ..., state: _Optional[_Union[Order.State, str]] = ..., latest_by_module: _Optional[_Iterable[_Union[OrderStatusEntry, _Mapping]]] = ..., open_blocking: _Optional[_Iterable[_Union[OrderStatusEntry, _Mapping]]] = ..., inventory_risk: _Optional[bool] = ...) -> None: ...

class TransitionOrderRequest(_message.Message):
    __slots__ = ("order_id", "target_state", "reason", "tracking_number", "carrier", "request_id")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TRACKING_NUMBER_FIELD_NUMBER: _ClassVar[int]
    CARRIER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    target_state: Order.State
    reason: str
    tracking_number: str
    carrier: str
    request_id: str
    def __init__(self, order_id: _Optional[str] = ..., target_state: _Optional[_Union[Order.State, str]] = ..., reason: _Optional[str] = ..., tracking_number: _Optional[str] = ..., carrier: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ReissueOrderRequest(_message.Message):
    __slots__ = ("order_id", "reason", "lines", "keep_unit_prices", "request_id")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    KEEP_UNIT_PRICES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    reason: str
    lines: _containers.RepeatedCompositeFieldContainer[LineQuantity]
    keep_unit_prices: bool
    request_id: str
    def __init__(self, order_id: _Optional[str] = ..., reason: _Optional[str] = ..., lines: _Optional[_Iterable[_Union[LineQuantity, _Mapping]]] = ..., keep_unit_prices: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class AcknowledgeOrderHandoffRequest(_message.Message):
    __slots__ = ("order_id", "external_reference", "module", "request_id")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    external_reference: str
    module: str
    request_id: str
    def __init__(self, order_id: _Optional[str] = ..., external_reference: _Optional[str] = ..., module: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class LineQuantity(_message.Message):
    __slots__ = ("line_id", "quantity")
    LINE_ID_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    line_id: str
    quantity: int
    def __init__(self, line_id: _Optional[str] = ..., quantity: _Optional[int] = ...) -> None: ...

class ShipOrderItemsRequest(_message.Message):
    __slots__ = ("order_id", "lines", "tracking_number", "carrier", "request_id")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    TRACKING_NUMBER_FIELD_NUMBER: _ClassVar[int]
    CARRIER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    lines: _containers.RepeatedCompositeFieldContainer[LineQuantity]
    tracking_number: str
    carrier: str
    request_id: str
    def __init__(self, order_id: _Optional[str] = ..., lines: _Optional[_Iterable[_Union[LineQuantity, _Mapping]]] = ..., tracking_number: _Optional[str] = ..., carrier: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class Shipment(_message.Message):
    __slots__ = ("id", "order_id", "lines", "tracking_number", "carrier", "create_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    TRACKING_NUMBER_FIELD_NUMBER: _ClassVar[int]
    CARRIER_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    order_id: str
    lines: _containers.RepeatedCompositeFieldContainer[LineQuantity]
    tracking_number: str
    carrier: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., order_id: _Optional[str] = ..., lines: _Optional[_Iterable[_Union[LineQuantity, _Mapping]]] = ..., tracking_number: _Optional[str] = ..., carrier: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ShipOrderItemsResponse(_message.Message):
    __slots__ = ("order", "shipment")
    ORDER_FIELD_NUMBER: _ClassVar[int]
    SHIPMENT_FIELD_NUMBER: _ClassVar[int]
    order: Order
    shipment: Shipment
    def __init__(self, order: _Optional[_Union[Order, _Mapping]] = ..., shipment: _Optional[_Union[Shipment, _Mapping]] = ...) -> None: ...

class GetShipmentStatusRequest(_message.Message):
    __slots__ = ("order_id",)
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    def __init__(self, order_id: _Optional[str] = ...) -> None: ...

class LineShipmentStatus(_message.Message):
    __slots__ = ("line_id", "sku", "ordered_quantity", "shipped_quantity", "remaining_quantity")
    LINE_ID_FIELD_NUMBER: _ClassVar[int]
    SKU_FIELD_NUMBER: _ClassVar[int]
    ORDERED_QUANTITY_FIELD_NUMBER: _ClassVar[int]
    SHIPPED_QUANTITY_FIELD_NUMBER: _ClassVar[int]
    REMAINING_QUANTITY_FIELD_NUMBER: _ClassVar[int]
    line_id: str
    sku: str
    ordered_quantity: int
    shipped_quantity: int
    remaining_quantity: int
    def __init__(self, line_id: _Optional[str] = ..., sku: _Optional[str] = ..., ordered_quantity: _Optional[int] = ..., shipped_quantity: _Optional[int] = ..., remaining_quantity: _Optional[int] = ...) -> None: ...

class ShipmentStatus(_message.Message):
    __slots__ = ("order_id", "state", "lines", "shipments")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    SHIPMENTS_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    state: Order.State
    lines: _containers.RepeatedCompositeFieldContainer[LineShipmentStatus]
    shipments: _containers.RepeatedCompositeFieldContainer[Shipment]
    def __init__(self, order_id: _Optional[str] = ..., state: _Optional[_Union[Order.State, str]] = ..., lines: _Optional[_Iterable[_Union[LineShipmentStatus, _Mapping]]] = ..., shipments: _Optional[_Iterable[_Union[Shipment, _Mapping]]] = ...) -> None: ...

class WatchOrderEventsRequest(_message.Message):
    __slots__ = ("types", "order_id", "after_event_id")
    TYPES_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    types: _containers.RepeatedScalarFieldContainer[OrderEventType]
    order_id: str
    after_event_id: int
    def __init__(self, types: _Optional[_Iterable[_Union[OrderEventType, str]]] = ..., order_id: _Optional[str] = ..., after_event_id: _Optional[int] = ...) -> None: ...

class OrderEvent(_message.Message):
    __slots__ = ("event_id", "type", "order_id", "state", "previous_state", "entry", "time")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_STATE_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    type: OrderEventType
    order_id: str
    state: Order.State
    previous_state: Order.State
    entry: OrderStatusEntry
    time: _timestamp_pb2.Timestamp
    def __init__(self, event_id: _Optional[int] = ..., type: _Optional[_Union[OrderEventType, str]] = ..., order_id: _Optional[str] = ..., state: _Optional[_Union[Order.State, str]] = ..., previous_state: _Optional[_Union[Order.State, str]] = ..., entry: _Optional[_Union[OrderStatusEntry, _Mapping]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class WatchOrderEventsResponse(_message.Message):
    __slots__ = ("events", "cursor")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[OrderEvent]
    cursor: int
    def __init__(self, events: _Optional[_Iterable[_Union[OrderEvent, _Mapping]]] = ..., cursor: _Optional[int] = ...) -> None: ...
