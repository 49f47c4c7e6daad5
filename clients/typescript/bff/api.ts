// The BFF's HTTP API, as the browser sees it (types only: the page imports them too).
//
// One JSON style for every body, request and response: proto3 canonical JSON of the
// Entrepot message behind the route (camelCase names, int64 as decimal strings, enums by
// name, Timestamps in RFC 3339, Money as {currencyCode, amountMinor}), with zero values
// emitted: scalar, enum and repeated fields are always present ("0", false, [], ""),
// message fields (timestamps, hold, approval) only when set. The response types are the
// generated JSON types (protoc-gen-es json_types=true), so they cannot drift from the wire.
//
//   GET    /                          the demo page (bff/web)
//   GET    /channel                   Channel          (the BFF's sales channel)
//   GET    /stock/:sku                Stock
//   GET    /stock/:sku/events         text/event-stream, see StockStreamEvent
//   POST   /carts                     {customerRef}                      -> 201 Cart
//   GET    /carts/:id                 Cart
//   POST   /carts/:id/lines           {version, line: {sku, quantity, unitPrice}} -> Cart
//   PATCH  /carts/:id/lines/:lineId   {version, line: {quantity?, unitPrice?}}    -> Cart
//   DELETE /carts/:id/lines/:lineId   {version}                          -> Cart
//   POST   /carts/:id/hold            {version, ttl?: "900s"}            -> Cart
//   DELETE /carts/:id/hold            {version}                          -> Cart
//   POST   /carts/:id/checkout        {version, payments, tax?, shipping?, discount?} -> CheckoutResult
//
// Request bodies are the proto3 JSON of the CartService request; the cart and line ids
// come from the path and request_id from the `Idempotency-Key` header (every POST, PATCH
// and DELETE; the BFF makes one up when it is missing and returns it in the same header).
// Repeating a request with the same key returns the first answer; the same key with
// another body is 409 REQUEST_ID_REUSED.
//
// Every error is an ErrorBody with the HTTP status from the gRPC code (bff/server.ts,
// HTTP_STATUS) and Entrepot's ErrorInfo reason: show users words chosen from `reason`,
// never `message` (meant for developers).
import type { EntrepotErrorInfo } from "../src/errors.js";

export type { CartJson as Cart, CartLineJson as CartLine, CheckoutCartResponseJson as CheckoutResult } from "../src/gen/entrepot/cart/v1/cart_pb.js";
export type {
  SkuStockJson as Stock,
  StockLevelJson as StockLevel,
  StockChangeEventJson as StockChangeEvent,
  WatchStockChangesResponseJson as StockChanges,
} from "../src/gen/entrepot/inventory/v1/inventory_pb.js";
export type { ChannelJson as Channel } from "../src/gen/entrepot/platform/v1/channel_pb.js";
export type { FieldViolation, PreconditionViolation } from "../src/errors.js";

/** `code` is the gRPC code in snake case; `domain` is "entrepot", or "bff" for the BFF's own errors. */
export interface ApiError extends EntrepotErrorInfo {
  status: number;
}

export interface ErrorBody {
  error: ApiError;
}

/**
 * Server-sent events of GET /stock/:sku/events (EventSource event names). The SSE `id` is the
 * WatchStockChanges cursor: a reconnecting EventSource sends it as Last-Event-ID (a reloaded
 * page passes it as `?lastEventId=`) and gets exactly the changes it missed.
 *   snapshot   data: Stock. The current levels; sent on a fresh connection, or when the
 *              resume point is older than the BFF's buffer (then replace all state).
 *   resumed    data: StockChanges with no events: resuming after `cursor` worked.
 *   change     data: StockChanges whose events are this SKU's (one committed transaction
 *              or more); apply per warehouse by movementId (the higher one wins).
 *   heartbeat  data: StockChanges with no events, every BFF_SSE_HEARTBEAT_MS: the newest
 *              cursor (keep it for a resume) and traffic that keeps proxies from closing.
 */
export type StockStreamEvent = "snapshot" | "resumed" | "change" | "heartbeat";
