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

class MovementType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MOVEMENT_TYPE_UNSPECIFIED: _ClassVar[MovementType]
    MOVEMENT_TYPE_RECEIVE: _ClassVar[MovementType]
    MOVEMENT_TYPE_ADJUST: _ClassVar[MovementType]
    MOVEMENT_TYPE_SET: _ClassVar[MovementType]
    MOVEMENT_TYPE_RESERVE: _ClassVar[MovementType]
    MOVEMENT_TYPE_RELEASE: _ClassVar[MovementType]
    MOVEMENT_TYPE_FULFIL: _ClassVar[MovementType]
    MOVEMENT_TYPE_RETURN: _ClassVar[MovementType]
    MOVEMENT_TYPE_IMPORT: _ClassVar[MovementType]
    MOVEMENT_TYPE_SYNC: _ClassVar[MovementType]
    MOVEMENT_TYPE_AUDIT: _ClassVar[MovementType]

class SyncEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SYNC_EVENT_KIND_UNSPECIFIED: _ClassVar[SyncEventKind]
    SYNC_EVENT_KIND_SET: _ClassVar[SyncEventKind]
    SYNC_EVENT_KIND_ADJUST: _ClassVar[SyncEventKind]
    SYNC_EVENT_KIND_RECEIVE: _ClassVar[SyncEventKind]

class StockDriftKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOCK_DRIFT_KIND_UNSPECIFIED: _ClassVar[StockDriftKind]
    STOCK_DRIFT_KIND_ON_HAND: _ClassVar[StockDriftKind]
    STOCK_DRIFT_KIND_RESERVED: _ClassVar[StockDriftKind]
    STOCK_DRIFT_KIND_LOTS: _ClassVar[StockDriftKind]

class AllocationStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALLOCATION_STRATEGY_UNSPECIFIED: _ClassVar[AllocationStrategy]
    ALLOCATION_STRATEGY_PRIORITY: _ClassVar[AllocationStrategy]
    ALLOCATION_STRATEGY_HIGH_STOCK: _ClassVar[AllocationStrategy]
    ALLOCATION_STRATEGY_FEWEST_SPLITS: _ClassVar[AllocationStrategy]
    ALLOCATION_STRATEGY_NEAREST: _ClassVar[AllocationStrategy]
MOVEMENT_TYPE_UNSPECIFIED: MovementType
MOVEMENT_TYPE_RECEIVE: MovementType
MOVEMENT_TYPE_ADJUST: MovementType
MOVEMENT_TYPE_SET: MovementType
MOVEMENT_TYPE_RESERVE: MovementType
MOVEMENT_TYPE_RELEASE: MovementType
MOVEMENT_TYPE_FULFIL: MovementType
MOVEMENT_TYPE_RETURN: MovementType
MOVEMENT_TYPE_IMPORT: MovementType
MOVEMENT_TYPE_SYNC: MovementType
MOVEMENT_TYPE_AUDIT: MovementType
SYNC_EVENT_KIND_UNSPECIFIED: SyncEventKind
SYNC_EVENT_KIND_SET: SyncEventKind
SYNC_EVENT_KIND_ADJUST: SyncEventKind
SYNC_EVENT_KIND_RECEIVE: SyncEventKind
STOCK_DRIFT_KIND_UNSPECIFIED: StockDriftKind
STOCK_DRIFT_KIND_ON_HAND: StockDriftKind
STOCK_DRIFT_KIND_RESERVED: StockDriftKind
STOCK_DRIFT_KIND_LOTS: StockDriftKind
ALLOCATION_STRATEGY_UNSPECIFIED: AllocationStrategy
ALLOCATION_STRATEGY_PRIORITY: AllocationStrategy
ALLOCATION_STRATEGY_HIGH_STOCK: AllocationStrategy
ALLOCATION_STRATEGY_FEWEST_SPLITS: AllocationStrategy
ALLOCATION_STRATEGY_NEAREST: AllocationStrategy

class Warehouse(_message.Message):
    __slots__ = ("code", "name", "address", "contact", "priority", "active", "create_time", "update_time", "location")
    CODE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CONTACT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    code: str
    name: str
    address: _types_pb2.PostalAddress
    contact: _types_pb2.Contact
    priority: int
    active: bool
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    location: GeoPoint
    def __init__(self, code: _Optional[str] = ..., name: _Optional[str] = ..., address: _Optional[_Union[_types_pb2.PostalAddress, _Mapping]] = ..., contact: _Optional[_Union[_types_pb2.Contact, _Mapping]] = ..., priority: _Optional[int] = ..., active: _Optional[bool] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., location: _Optional[_Union[GeoPoint, _Mapping]] = ...) -> None: ...

class CreateWarehouseRequest(_message.Message):
    __slots__ = ("warehouse", "request_id")
    WAREHOUSE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    warehouse: Warehouse
    request_id: str
    def __init__(self, warehouse: _Optional[_Union[Warehouse, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetWarehouseRequest(_message.Message):
    __slots__ = ("code",)
    CODE_FIELD_NUMBER: _ClassVar[int]
    code: str
    def __init__(self, code: _Optional[str] = ...) -> None: ...

class UpdateWarehouseRequest(_message.Message):
    __slots__ = ("warehouse", "update_mask", "request_id")
    WAREHOUSE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    warehouse: Warehouse
    update_mask: _field_mask_pb2.FieldMask
    request_id: str
    def __init__(self, warehouse: _Optional[_Union[Warehouse, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class DeactivateWarehouseRequest(_message.Message):
    __slots__ = ("code", "request_id")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    code: str
    request_id: str
    def __init__(self, code: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ListWarehousesRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "include_inactive")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_INACTIVE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    include_inactive: bool
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., include_inactive: _Optional[bool] = ...) -> None: ...

class ListWarehousesResponse(_message.Message):
    __slots__ = ("warehouses", "next_page_token")
    WAREHOUSES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    warehouses: _containers.RepeatedCompositeFieldContainer[Warehouse]
    next_page_token: str
    def __init__(self, warehouses: _Optional[_Iterable[_Union[Warehouse, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class InventoryItem(_message.Message):
    __slots__ = ("sku", "track_inventory", "allow_backorder", "max_backorder_quantity", "low_stock_threshold", "create_time", "update_time", "components")
    SKU_FIELD_NUMBER: _ClassVar[int]
    TRACK_INVENTORY_FIELD_NUMBER: _ClassVar[int]
    ALLOW_BACKORDER_FIELD_NUMBER: _ClassVar[int]
    MAX_BACKORDER_QUANTITY_FIELD_NUMBER: _ClassVar[int]
    LOW_STOCK_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    sku: str
    track_inventory: bool
    allow_backorder: bool
    max_backorder_quantity: int
    low_stock_threshold: int
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    components: _containers.RepeatedCompositeFieldContainer[KitComponent]
    def __init__(self, sku: _Optional[str] = ..., track_inventory: _Optional[bool] = ..., allow_backorder: _Optional[bool] = ..., max_backorder_quantity: _Optional[int] = ..., low_stock_threshold: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., components: _Optional[_Iterable[_Union[KitComponent, _Mapping]]] = ...) -> None: ...

class KitComponent(_message.Message):
    __slots__ = ("sku", "quantity")
    SKU_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    sku: str
    quantity: int
    def __init__(self, sku: _Optional[str] = ..., quantity: _Optional[int] = ...) -> None: ...

class SetKitComponentsRequest(_message.Message):
    __slots__ = ("sku", "components", "request_id")
    SKU_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    sku: str
    components: _containers.RepeatedCompositeFieldContainer[KitComponent]
    request_id: str
    def __init__(self, sku: _Optional[str] = ..., components: _Optional[_Iterable[_Union[KitComponent, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class UpsertInventoryItemRequest(_message.Message):
    __slots__ = ("item", "request_id")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    item: InventoryItem
    request_id: str
    def __init__(self, item: _Optional[_Union[InventoryItem, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetInventoryItemRequest(_message.Message):
    __slots__ = ("sku",)
    SKU_FIELD_NUMBER: _ClassVar[int]
    sku: str
    def __init__(self, sku: _Optional[str] = ...) -> None: ...

class StockLevel(_message.Message):
    __slots__ = ("sku", "warehouse_code", "on_hand", "reserved", "available", "backordered", "update_time")
    SKU_FIELD_NUMBER: _ClassVar[int]
    WAREHOUSE_CODE_FIELD_NUMBER: _ClassVar[int]
    ON_HAND_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    BACKORDERED_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    sku: str
    warehouse_code: str
    on_hand: int
    reserved: int
    available: int
    backordered: int
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, sku: _Optional[str] = ..., warehouse_code: _Optional[str] = ..., on_hand: _Optional[int] = ..., reserved: _Optional[int] = ..., available: _Optional[int] = ..., backordered: _Optional[int] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SkuStock(_message.Message):
    __slots__ = ("sku", "warehouses", "on_hand", "reserved", "available", "backordered", "below_threshold", "components")
    SKU_FIELD_NUMBER: _ClassVar[int]
    WAREHOUSES_FIELD_NUMBER: _ClassVar[int]
    ON_HAND_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    BACKORDERED_FIELD_NUMBER: _ClassVar[int]
    BELOW_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    sku: str
    warehouses: _containers.RepeatedCompositeFieldContainer[StockLevel]
    on_hand: int
    reserved: int
    available: int
    backordered: int
    below_threshold: bool
    components: _containers.RepeatedCompositeFieldContainer[KitComponent]
    def __init__(self, sku: _Optional[str] = ..., warehouses: _Optional[_Iterable[_Union[StockLevel, _Mapping]]] = ..., on_hand: _Optional[int] = ..., reserved: _Optional[int] = ..., available: _Optional[int] = ..., backordered: _Optional[int] = ..., below_threshold: _Optional[bool] = ..., components: _Optional[_Iterable[_Union[KitComponent, _Mapping]]] = ...) -> None: ...

class GetStockLevelRequest(_message.Message):
    __slots__ = ("sku", "warehouse_code", "channel")
    SKU_FIELD_NUMBER: _ClassVar[int]
    WAREHOUSE_CODE_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    sku: str
    warehouse_code: str
    channel: str
    def __init__(self, sku: _Optional[str] = ..., warehouse_code: _Optional[str] = ..., channel: _Optional[str] = ...) -> None: ...

class BatchGetStockLevelsRequest(_message.Message):
    __slots__ = ("skus", "channel")
    SKUS_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    skus: _containers.RepeatedScalarFieldContainer[str]
    channel: str
    def __init__(self, skus: _Optional[_Iterable[str]] = ..., channel: _Optional[str] = ...) -> None: ...

class BatchGetStockLevelsResponse(_message.Message):
    __slots__ = ("stocks", "missing_skus")
    STOCKS_FIELD_NUMBER: _ClassVar[int]
    MISSING_SKUS_FIELD_NUMBER: _ClassVar[int]
    stocks: _containers.RepeatedCompositeFieldContainer[SkuStock]
    missing_skus: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stocks: _Optional[_Iterable[_Union[SkuStock, _Mapping]]] = ..., missing_skus: _Optional[_Iterable[str]] = ...) -> None: ...

class ListStockLevelsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "warehouse_code", "sku_prefix", "below_threshold_only", "backordered_only", "channel")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WAREHOUSE_CODE_FIELD_NUMBER: _ClassVar[int]
    SKU_PREFIX_FIELD_NUMBER: _ClassVar[int]
    BELOW_THRESHOLD_ONLY_FIELD_NUMBER: _ClassVar[int]
    BACKORDERED_ONLY_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    warehouse_code: str
    sku_prefix: str
    below_threshold_only: bool
    backordered_only: bool
    channel: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., warehouse_code: _Optional[str] = ..., sku_prefix: _Optional[str] = ..., below_threshold_only: _Optional[bool] = ..., backordered_only: _Optional[bool] = ..., channel: _Optional[str] = ...) -> None: ...

class ListStockLevelsResponse(_message.Message):
    __slots__ = ("levels", "next_page_token")
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    levels: _containers.RepeatedCompositeFieldContainer[StockLevel]
    next_page_token: str
    def __init__(self, levels: _Optional[_Iterable[_Union[StockLevel, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class StockMovement(_message.Message):
    __slots__ = ("id", "sku", "warehouse_code", "type", "on_hand_before", "on_hand_after", "reserved_before", "reserved_after", "on_hand_delta", "reserved_delta", "reason", "source", "actor", "reference", "cost", "create_time", "kit_sku")
    ID_FIELD_NUMBER: _ClassVar[int]
    SKU_FIELD_NUMBER: _ClassVar[int]
    WAREHOUSE_CODE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ON_HAND_BEFORE_FIELD_NUMBER: _ClassVar[int]
    ON_HAND_AFTER_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    RESERVED_AFTER_FIELD_NUMBER: _ClassVar[int]
    ON_HAND_DELTA_FIELD_NUMBER: _ClassVar[int]
    RESERVED_DELTA_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    KIT_SKU_FIELD_NUMBER: _ClassVar[int]
    id: int
    sku: str
    warehouse_code: str
    type: MovementType
    on_hand_before: int
    on_hand_after: int
    reserved_before: int
    reserved_after: int
    on_hand_delta: int
    reserved_delta: int
    reason: str
    source: str
    actor: str
    reference: str
    cost: _types_pb2.Money
    create_time: _timestamp_pb2.Timestamp
    kit_sku: str
    def __init__(self, id: _Optional[int] = ..., sku: _Optional[str] = ..., warehouse_code: _Optional[str] = ..., type: _Optional[_Union[MovementType, str]] = ..., on_hand_before: _Optional[int] = ..., on_hand_after: _Optional[int] = ..., reserved_before: _Optional[int] = ..., reserved_after: _Optional[int] = ..., on_hand_delta: _Optional[int] = ..., reserved_delta: _Optional[int] = ..., reason: _Optional[str] = ..., source: _Optional[str] = ..., actor: _Optional[str] = ..., reference: _Optional[str] = ..., cost: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kit_sku: _Optional[str] = ...) -> None: ...

class StockChange(_message.Message):
    __slots__ = ("level", "movement")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MOVEMENT_FIELD_NUMBER: _ClassVar[int]
    level: StockLevel
    movement: StockMovement
    def __init__(self, level: _Optional[_Union[StockLevel, _Mapping]] = ..., movement: _Optional[_Union[StockMovement, _Mapping]] = ...) -> None: ...

class AdjustStockRequest(_message.Message):
    __slots__ = ("sku", "warehouse_code", "delta", "reason", "reference", "request_id")
    SKU_FIELD_NUMBER: _ClassVar[int]
    WAREHOUSE_CODE_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    sku: str
    warehouse_code: str
    delta: int
    reason: str
    reference: str
    request_id: str
    def __init__(self, sku: _Optional[str] = ..., warehouse_code: _Optional[str] = ..., delta: _Optional[int] = ..., reason: _Optional[str] = ..., reference: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class SetStockRequest(_message.Message):
    __slots__ = ("sku", "warehouse_code", "quantity", "expected_on_hand", "reason", "reference", "request_id")
    SKU_FIELD_NUMBER: _ClassVar[int]
    WAREHOUSE_CODE_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_ON_HAND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    sku: str
    warehouse_code: str
    quantity: int
    expected_on_hand: int
    reason: str
    reference: str
    request_id: str
    def __init__(self, sku: _Optional[str] = ..., warehouse_code: _Optional[str] = ..., quantity: _Optional[int] = ..., expected_on_hand: _Optional[int] = ..., reason: _Optional[str] = ..., reference: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class StockAdjustment(_message.Message):
    __slots__ = ("sku", "warehouse_code", "delta", "reason")
    SKU_FIELD_NUMBER: _ClassVar[int]
    WAREHOUSE_CODE_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    sku: str
    warehouse_code: str
    delta: int
    reason: str
    def __init__(self, sku: _Optional[str] = ..., warehouse_code: _Optional[str] = ..., delta: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class BulkAdjustStockRequest(_message.Message):
    __slots__ = ("adjustments", "reference", "request_id")
    ADJUSTMENTS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    adjustments: _containers.RepeatedCompositeFieldContainer[StockAdjustment]
    reference: str
    request_id: str
    def __init__(self, adjustments: _Optional[_Iterable[_Union[StockAdjustment, _Mapping]]] = ..., reference: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class BulkAdjustStockResponse(_message.Message):
    __slots__ = ("changes",)
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[StockChange]
    def __init__(self, changes: _Optional[_Iterable[_Union[StockChange, _Mapping]]] = ...) -> None: ...

class ReceiveStockRequest(_message.Message):
    __slots__ = ("sku", "warehouse_code", "quantity", "unit_cost", "lot_code", "reason", "reference", "request_id")
    SKU_FIELD_NUMBER: _ClassVar[int]
    WAREHOUSE_CODE_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    UNIT_COST_FIELD_NUMBER: _ClassVar[int]
    LOT_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    sku: str
    warehouse_code: str
    quantity: int
    unit_cost: _types_pb2.Money
    lot_code: str
    reason: str
    reference: str
    request_id: str
    def __init__(self, sku: _Optional[str] = ..., warehouse_code: _Optional[str] = ..., quantity: _Optional[int] = ..., unit_cost: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., lot_code: _Optional[str] = ..., reason: _Optional[str] = ..., reference: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ReturnStockRequest(_message.Message):
    __slots__ = ("sku", "warehouse_code", "quantity", "reason", "reference", "request_id")
    SKU_FIELD_NUMBER: _ClassVar[int]
    WAREHOUSE_CODE_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    sku: str
    warehouse_code: str
    quantity: int
    reason: str
    reference: str
    request_id: str
    def __init__(self, sku: _Optional[str] = ..., warehouse_code: _Optional[str] = ..., quantity: _Optional[int] = ..., reason: _Optional[str] = ..., reference: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ListStockMovementsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "sku", "warehouse_code", "types", "reference", "start_time", "end_time")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SKU_FIELD_NUMBER: _ClassVar[int]
    WAREHOUSE_CODE_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    sku: str
    warehouse_code: str
    types: _containers.RepeatedScalarFieldContainer[MovementType]
    reference: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., sku: _Optional[str] = ..., warehouse_code: _Optional[str] = ..., types: _Optional[_Iterable[_Union[MovementType, str]]] = ..., reference: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListStockMovementsResponse(_message.Message):
    __slots__ = ("movements", "next_page_token")
    MOVEMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    movements: _containers.RepeatedCompositeFieldContainer[StockMovement]
    next_page_token: str
    def __init__(self, movements: _Optional[_Iterable[_Union[StockMovement, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ReservationLineRequest(_message.Message):
    __slots__ = ("sku", "quantity", "warehouse_code")
    SKU_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    WAREHOUSE_CODE_FIELD_NUMBER: _ClassVar[int]
    sku: str
    quantity: int
    warehouse_code: str
    def __init__(self, sku: _Optional[str] = ..., quantity: _Optional[int] = ..., warehouse_code: _Optional[str] = ...) -> None: ...

class ReserveStockRequest(_message.Message):
    __slots__ = ("lines", "reference", "ttl", "request_id", "destination")
    LINES_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedCompositeFieldContainer[ReservationLineRequest]
    reference: str
    ttl: _duration_pb2.Duration
    request_id: str
    destination: GeoPoint
    def __init__(self, lines: _Optional[_Iterable[_Union[ReservationLineRequest, _Mapping]]] = ..., reference: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., request_id: _Optional[str] = ..., destination: _Optional[_Union[GeoPoint, _Mapping]] = ...) -> None: ...

class ReservationLine(_message.Message):
    __slots__ = ("sku", "warehouse_code", "quantity", "backordered_quantity", "fulfilled_quantity", "released_quantity", "open_quantity", "kit_sku", "quantity_per_kit")
    SKU_FIELD_NUMBER: _ClassVar[int]
    WAREHOUSE_CODE_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    BACKORDERED_QUANTITY_FIELD_NUMBER: _ClassVar[int]
    FULFILLED_QUANTITY_FIELD_NUMBER: _ClassVar[int]
    RELEASED_QUANTITY_FIELD_NUMBER: _ClassVar[int]
    OPEN_QUANTITY_FIELD_NUMBER: _ClassVar[int]
    KIT_SKU_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_PER_KIT_FIELD_NUMBER: _ClassVar[int]
    sku: str
    warehouse_code: str
    quantity: int
    backordered_quantity: int
    fulfilled_quantity: int
    released_quantity: int
    open_quantity: int
    kit_sku: str
    quantity_per_kit: int
    def __init__(self, sku: _Optional[str] = ..., warehouse_code: _Optional[str] = ..., quantity: _Optional[int] = ..., backordered_quantity: _Optional[int] = ..., fulfilled_quantity: _Optional[int] = ..., released_quantity: _Optional[int] = ..., open_quantity: _Optional[int] = ..., kit_sku: _Optional[str] = ..., quantity_per_kit: _Optional[int] = ...) -> None: ...

class ReservationKit(_message.Message):
    __slots__ = ("sku", "quantity", "fulfilled_quantity", "released_quantity", "open_quantity")
    SKU_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    FULFILLED_QUANTITY_FIELD_NUMBER: _ClassVar[int]
    RELEASED_QUANTITY_FIELD_NUMBER: _ClassVar[int]
    OPEN_QUANTITY_FIELD_NUMBER: _ClassVar[int]
    sku: str
    quantity: int
    fulfilled_quantity: int
    released_quantity: int
    open_quantity: int
    def __init__(self, sku: _Optional[str] = ..., quantity: _Optional[int] = ..., fulfilled_quantity: _Optional[int] = ..., released_quantity: _Optional[int] = ..., open_quantity: _Optional[int] = ...) -> None: ...

class Reservation(_message.Message):
    __slots__ = ("id", "reference", "state", "lines", "expire_time", "create_time", "update_time", "backordered_quantity", "kits")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Reservation.State]
        STATE_ACTIVE: _ClassVar[Reservation.State]
        STATE_FULFILLED: _ClassVar[Reservation.State]
        STATE_RELEASED: _ClassVar[Reservation.State]
        STATE_EXPIRED: _ClassVar[Reservation.State]
    STATE_UNSPECIFIED: Reservation.State
    STATE_ACTIVE: Reservation.State
    STATE_FULFILLED: Reservation.State
    STATE_RELEASED: Reservation.State
    STATE_EXPIRED: Reservation.State
    ID_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    BACKORDERED_QUANTITY_FIELD_NUMBER: _ClassVar[int]
    KITS_FIELD_NUMBER: _ClassVar[int]
    id: str
    reference: str
    state: Reservation.State
    lines: _containers.RepeatedCompositeFieldContainer[ReservationLine]
    expire_time: _timestamp_pb2.Timestamp
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    backordered_quantity: int
    kits: _containers.RepeatedCompositeFieldContainer[ReservationKit]
    def __init__(self, id: _Optional[str] = ..., reference: _Optional[str] = ..., state: _Optional[_Union[Reservation.State, str]] = ..., lines: _Optional[_Iterable[_Union[ReservationLine, _Mapping]]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., backordered_quantity: _Optional[int] = ..., kits: _Optional[_Iterable[_Union[ReservationKit, _Mapping]]] = ...) -> None: ...

class GetReservationRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListReservationsRequest(_message.Message):
    __slots__ = ("reference", "state", "page_size", "page_token")
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    reference: str
    state: Reservation.State
    page_size: int
    page_token: str
    def __init__(self, reference: _Optional[str] = ..., state: _Optional[_Union[Reservation.State, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListReservationsResponse(_message.Message):
    __slots__ = ("reservations", "next_page_token")
    RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    reservations: _containers.RepeatedCompositeFieldContainer[Reservation]
    next_page_token: str
    def __init__(self, reservations: _Optional[_Iterable[_Union[Reservation, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ExtendReservationRequest(_message.Message):
    __slots__ = ("id", "ttl", "request_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    ttl: _duration_pb2.Duration
    request_id: str
    def __init__(self, id: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ReservationQuantity(_message.Message):
    __slots__ = ("sku", "warehouse_code", "quantity")
    SKU_FIELD_NUMBER: _ClassVar[int]
    WAREHOUSE_CODE_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    sku: str
    warehouse_code: str
    quantity: int
    def __init__(self, sku: _Optional[str] = ..., warehouse_code: _Optional[str] = ..., quantity: _Optional[int] = ...) -> None: ...

class ReleaseReservationRequest(_message.Message):
    __slots__ = ("id", "lines", "reason", "request_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    lines: _containers.RepeatedCompositeFieldContainer[ReservationQuantity]
    reason: str
    request_id: str
    def __init__(self, id: _Optional[str] = ..., lines: _Optional[_Iterable[_Union[ReservationQuantity, _Mapping]]] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class FulfillReservationRequest(_message.Message):
    __slots__ = ("id", "lines", "reference", "request_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    lines: _containers.RepeatedCompositeFieldContainer[ReservationQuantity]
    reference: str
    request_id: str
    def __init__(self, id: _Optional[str] = ..., lines: _Optional[_Iterable[_Union[ReservationQuantity, _Mapping]]] = ..., reference: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class FulfillReservationResponse(_message.Message):
    __slots__ = ("reservation", "movements", "kit_costs")
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    MOVEMENTS_FIELD_NUMBER: _ClassVar[int]
    KIT_COSTS_FIELD_NUMBER: _ClassVar[int]
    reservation: Reservation
    movements: _containers.RepeatedCompositeFieldContainer[StockMovement]
    kit_costs: _containers.RepeatedCompositeFieldContainer[KitCost]
    def __init__(self, reservation: _Optional[_Union[Reservation, _Mapping]] = ..., movements: _Optional[_Iterable[_Union[StockMovement, _Mapping]]] = ..., kit_costs: _Optional[_Iterable[_Union[KitCost, _Mapping]]] = ...) -> None: ...

class KitCost(_message.Message):
    __slots__ = ("kit_sku", "quantity", "cost")
    KIT_SKU_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    kit_sku: str
    quantity: int
    cost: _types_pb2.Money
    def __init__(self, kit_sku: _Optional[str] = ..., quantity: _Optional[int] = ..., cost: _Optional[_Union[_types_pb2.Money, _Mapping]] = ...) -> None: ...

class SyncEvent(_message.Message):
    __slots__ = ("event_id", "sku", "warehouse_code", "kind", "quantity", "reason", "occurred_at", "unit_cost")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    SKU_FIELD_NUMBER: _ClassVar[int]
    WAREHOUSE_CODE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    UNIT_COST_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    sku: str
    warehouse_code: str
    kind: SyncEventKind
    quantity: int
    reason: str
    occurred_at: _timestamp_pb2.Timestamp
    unit_cost: _types_pb2.Money
    def __init__(self, event_id: _Optional[str] = ..., sku: _Optional[str] = ..., warehouse_code: _Optional[str] = ..., kind: _Optional[_Union[SyncEventKind, str]] = ..., quantity: _Optional[int] = ..., reason: _Optional[str] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., unit_cost: _Optional[_Union[_types_pb2.Money, _Mapping]] = ...) -> None: ...

class SyncStart(_message.Message):
    __slots__ = ("source",)
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    source: str
    def __init__(self, source: _Optional[str] = ...) -> None: ...

class SyncBatch(_message.Message):
    __slots__ = ("batch_seq", "events")
    BATCH_SEQ_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    batch_seq: int
    events: _containers.RepeatedCompositeFieldContainer[SyncEvent]
    def __init__(self, batch_seq: _Optional[int] = ..., events: _Optional[_Iterable[_Union[SyncEvent, _Mapping]]] = ...) -> None: ...

class SyncStockRequest(_message.Message):
    __slots__ = ("start", "batch")
    START_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    start: SyncStart
    batch: SyncBatch
    def __init__(self, start: _Optional[_Union[SyncStart, _Mapping]] = ..., batch: _Optional[_Union[SyncBatch, _Mapping]] = ...) -> None: ...

class SyncEventError(_message.Message):
    __slots__ = ("event_id", "reason", "message")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    reason: str
    message: str
    def __init__(self, event_id: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class SyncAck(_message.Message):
    __slots__ = ("batch_seq", "applied", "duplicate", "stale", "rejected", "errors", "cursor")
    BATCH_SEQ_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    batch_seq: int
    applied: int
    duplicate: int
    stale: int
    rejected: int
    errors: _containers.RepeatedCompositeFieldContainer[SyncEventError]
    cursor: SyncCursor
    def __init__(self, batch_seq: _Optional[int] = ..., applied: _Optional[int] = ..., duplicate: _Optional[int] = ..., stale: _Optional[int] = ..., rejected: _Optional[int] = ..., errors: _Optional[_Iterable[_Union[SyncEventError, _Mapping]]] = ..., cursor: _Optional[_Union[SyncCursor, _Mapping]] = ...) -> None: ...

class SyncStockResponse(_message.Message):
    __slots__ = ("ready", "ack")
    READY_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    ready: SyncCursor
    ack: SyncAck
    def __init__(self, ready: _Optional[_Union[SyncCursor, _Mapping]] = ..., ack: _Optional[_Union[SyncAck, _Mapping]] = ...) -> None: ...

class GetSyncCursorRequest(_message.Message):
    __slots__ = ("source",)
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    source: str
    def __init__(self, source: _Optional[str] = ...) -> None: ...

class SyncCursor(_message.Message):
    __slots__ = ("source", "last_event_id", "events_seen", "events_applied", "update_time")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENTS_SEEN_FIELD_NUMBER: _ClassVar[int]
    EVENTS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    source: str
    last_event_id: str
    events_seen: int
    events_applied: int
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, source: _Optional[str] = ..., last_event_id: _Optional[str] = ..., events_seen: _Optional[int] = ..., events_applied: _Optional[int] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class WatchStockChangesRequest(_message.Message):
    __slots__ = ("skus", "warehouse_codes", "below_threshold_only", "after_event_id", "channel")
    SKUS_FIELD_NUMBER: _ClassVar[int]
    WAREHOUSE_CODES_FIELD_NUMBER: _ClassVar[int]
    BELOW_THRESHOLD_ONLY_FIELD_NUMBER: _ClassVar[int]
    AFTER_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    skus: _containers.RepeatedScalarFieldContainer[str]
    warehouse_codes: _containers.RepeatedScalarFieldContainer[str]
    below_threshold_only: bool
    after_event_id: int
    channel: str
    def __init__(self, skus: _Optional[_Iterable[str]] = ..., warehouse_codes: _Optional[_Iterable[str]] = ..., below_threshold_only: _Optional[bool] = ..., after_event_id: _Optional[int] = ..., channel: _Optional[str] = ...) -> None: ...

class StockChangeEvent(_message.Message):
    __slots__ = ("event_id", "sku", "warehouse_code", "type", "on_hand_delta", "reserved_delta", "on_hand", "reserved", "available", "reason", "time", "below_threshold", "movement_id", "kit_sku", "first_movement_id")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    SKU_FIELD_NUMBER: _ClassVar[int]
    WAREHOUSE_CODE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ON_HAND_DELTA_FIELD_NUMBER: _ClassVar[int]
    RESERVED_DELTA_FIELD_NUMBER: _ClassVar[int]
    ON_HAND_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    BELOW_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MOVEMENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIT_SKU_FIELD_NUMBER: _ClassVar[int]
    FIRST_MOVEMENT_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    sku: str
    warehouse_code: str
    type: MovementType
    on_hand_delta: int
    reserved_delta: int
    on_hand: int
    reserved: int
    available: int
    reason: str
    time: _timestamp_pb2.Timestamp
    below_threshold: bool
    movement_id: int
    kit_sku: str
    first_movement_id: int
    def __init__(self, event_id: _Optional[int] = ..., sku: _Optional[str] = ..., warehouse_code: _Optional[str] = ..., type: _Optional[_Union[MovementType, str]] = ..., on_hand_delta: _Optional[int] = ..., reserved_delta: _Optional[int] = ..., on_hand: _Optional[int] = ..., reserved: _Optional[int] = ..., available: _Optional[int] = ..., reason: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., below_threshold: _Optional[bool] = ..., movement_id: _Optional[int] = ..., kit_sku: _Optional[str] = ..., first_movement_id: _Optional[int] = ...) -> None: ...

class WatchStockChangesResponse(_message.Message):
    __slots__ = ("events", "cursor")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[StockChangeEvent]
    cursor: int
    def __init__(self, events: _Optional[_Iterable[_Union[StockChangeEvent, _Mapping]]] = ..., cursor: _Optional[int] = ...) -> None: ...

class StockDrift(_message.Message):
    __slots__ = ("sku", "warehouse_code", "kind", "counter", "derived", "difference")
    SKU_FIELD_NUMBER: _ClassVar[int]
    WAREHOUSE_CODE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    COUNTER_FIELD_NUMBER: _ClassVar[int]
    DERIVED_FIELD_NUMBER: _ClassVar[int]
    DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    sku: str
    warehouse_code: str
    kind: StockDriftKind
    counter: int
    derived: int
    difference: int
    def __init__(self, sku: _Optional[str] = ..., warehouse_code: _Optional[str] = ..., kind: _Optional[_Union[StockDriftKind, str]] = ..., counter: _Optional[int] = ..., derived: _Optional[int] = ..., difference: _Optional[int] = ...) -> None: ...

class AuditStockRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "skus", "warehouse_codes", "kinds", "whole_ledger")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SKUS_FIELD_NUMBER: _ClassVar[int]
    WAREHOUSE_CODES_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    WHOLE_LEDGER_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    skus: _containers.RepeatedScalarFieldContainer[str]
    warehouse_codes: _containers.RepeatedScalarFieldContainer[str]
    kinds: _containers.RepeatedScalarFieldContainer[StockDriftKind]
    whole_ledger: bool
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., skus: _Optional[_Iterable[str]] = ..., warehouse_codes: _Optional[_Iterable[str]] = ..., kinds: _Optional[_Iterable[_Union[StockDriftKind, str]]] = ..., whole_ledger: _Optional[bool] = ...) -> None: ...

class AuditStockResponse(_message.Message):
    __slots__ = ("drifts", "next_page_token", "levels_checked")
    DRIFTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LEVELS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    drifts: _containers.RepeatedCompositeFieldContainer[StockDrift]
    next_page_token: str
    levels_checked: int
    def __init__(self, drifts: _Optional[_Iterable[_Union[StockDrift, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., levels_checked: _Optional[int] = ...) -> None: ...

class RepairStockRequest(_message.Message):
    __slots__ = ("sku", "warehouse_code", "kind", "expected_counter", "expected_derived", "reason", "request_id")
    SKU_FIELD_NUMBER: _ClassVar[int]
    WAREHOUSE_CODE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_COUNTER_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_DERIVED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    sku: str
    warehouse_code: str
    kind: StockDriftKind
    expected_counter: int
    expected_derived: int
    reason: str
    request_id: str
    def __init__(self, sku: _Optional[str] = ..., warehouse_code: _Optional[str] = ..., kind: _Optional[_Union[StockDriftKind, str]] = ..., expected_counter: _Optional[int] = ..., expected_derived: _Optional[int] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class RepairStockResponse(_message.Message):
    __slots__ = ("repaired", "drift", "movement", "level")
    REPAIRED_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    MOVEMENT_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    repaired: bool
    drift: StockDrift
    movement: StockMovement
    level: StockLevel
    def __init__(self, repaired: _Optional[bool] = ..., drift: _Optional[_Union[StockDrift, _Mapping]] = ..., movement: _Optional[_Union[StockMovement, _Mapping]] = ..., level: _Optional[_Union[StockLevel, _Mapping]] = ...) -> None: ...

class GeoPoint(_message.Message):
    __slots__ = ("latitude", "longitude")
    LATITUDE_FIELD_NUMBER: _ClassVar[int]
    LONGITUDE_FIELD_NUMBER: _ClassVar[int]
    latitude: float
    longitude: float
    def __init__(self, latitude: _Optional[float] = ..., longitude: _Optional[float] = ...) -> None: ...

class ChannelAllocation(_message.Message):
    __slots__ = ("channel", "warehouse_codes", "strategy", "update_time")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    WAREHOUSE_CODES_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    channel: str
    warehouse_codes: _containers.RepeatedScalarFieldContainer[str]
    strategy: AllocationStrategy
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, channel: _Optional[str] = ..., warehouse_codes: _Optional[_Iterable[str]] = ..., strategy: _Optional[_Union[AllocationStrategy, str]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SetChannelAllocationRequest(_message.Message):
    __slots__ = ("allocation", "request_id")
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    allocation: ChannelAllocation
    request_id: str
    def __init__(self, allocation: _Optional[_Union[ChannelAllocation, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetChannelAllocationRequest(_message.Message):
    __slots__ = ("channel",)
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    channel: str
    def __init__(self, channel: _Optional[str] = ...) -> None: ...
