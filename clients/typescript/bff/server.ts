// A BFF (backend for frontend) for browsers: plain node:http, calling Entrepot over gRPC
// with the typed client. Routes, the JSON style and the error shape: bff/api.ts. Live
// stock over server-sent events: bff/stock-feed.ts. The demo page: bff/web.
//
// Env: ENTREPOT_TARGET (host:port), ENTREPOT_TOKEN (the BFF's service token: inventory.read,
// inventory.watch, channel.read, cart.read, cart.write, cart.checkout), ENTREPOT_CHANNEL (the
// sales channel), BFF_PORT (0 = any), BFF_HOST (default 127.0.0.1),
// BFF_ALLOWED_ORIGINS (comma-separated origins allowed to call cross-origin, e.g.
// "https://shop.example.com"; the BFF's own page is same-origin and always allowed),
// BFF_SSE_HEARTBEAT_MS (default 15000), BFF_SSE_BUFFER (watch messages kept for resuming,
// default 10000), BFF_TIMEOUT_MS (deadline of every Entrepot call, default 10000).
//
// CORS: only listed origins get Access-Control-Allow-Origin (echoed, with Vary: Origin);
// other cross-origin requests are 403 ORIGIN_NOT_ALLOWED before anything reaches Entrepot.
// Credentials policy: none. The BFF calls Entrepot with its own token and reads no cookies,
// so it never sends Access-Control-Allow-Credentials: browsers call it without credentials.
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import { randomUUID } from "node:crypto";
import { readFile } from "node:fs/promises";
import type { AddressInfo } from "node:net";
import { fromJson, toJson, type DescMessage, type JsonObject, type JsonValue, type MessageShape } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";

import { Entrepot, entrepotError } from "../src/index.js";
import {
  AddCartLineRequestSchema,
  CartSchema,
  CheckoutCartRequestSchema,
  CheckoutCartResponseSchema,
  CreateCartRequestSchema,
  HoldCartStockRequestSchema,
  ReleaseCartHoldRequestSchema,
  RemoveCartLineRequestSchema,
  UpdateCartLineRequestSchema,
} from "../src/gen/entrepot/cart/v1/cart_pb.js";
import { SkuStockSchema } from "../src/gen/entrepot/inventory/v1/inventory_pb.js";
import { ChannelSchema } from "../src/gen/entrepot/platform/v1/channel_pb.js";
import type { ApiError, ErrorBody } from "./api.js";
import { JSON_STYLE, StockFeed, type FeedOptions } from "./stock-feed.js";

/** The one gRPC code -> HTTP status table. */
export const HTTP_STATUS: Record<Code, number> = {
  [Code.Canceled]: 499,
  [Code.Unknown]: 502,
  [Code.InvalidArgument]: 400,
  [Code.DeadlineExceeded]: 504,
  [Code.NotFound]: 404,
  [Code.AlreadyExists]: 409,
  [Code.PermissionDenied]: 403,
  [Code.ResourceExhausted]: 429,
  [Code.FailedPrecondition]: 409,
  [Code.Aborted]: 409,
  [Code.OutOfRange]: 400,
  [Code.Unimplemented]: 501,
  [Code.Internal]: 502,
  [Code.Unavailable]: 503,
  [Code.DataLoss]: 502,
  [Code.Unauthenticated]: 502, // the BFF's own token was refused: not the browser's fault
};

/** The BFF's own refusals, in the same shape as Entrepot's (domain "bff"). */
class BffError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    readonly reason: string,
    message: string,
  ) {
    super(message);
  }
}

function apiError(err: unknown): ApiError {
  if (err instanceof BffError) {
    const { status, code, reason, message } = err;
    return { status, code, reason, message, domain: "bff", metadata: {}, fieldViolations: [], preconditionViolations: [] };
  }
  if (err instanceof ConnectError) return { ...entrepotError(err), status: HTTP_STATUS[err.code] };
  throw err; // a bug in the BFF: the caller logs it and answers 500
}

const SSE_HEADERS = {
  "content-type": "text/event-stream; charset=utf-8",
  "cache-control": "no-cache, no-transform",
  connection: "keep-alive",
  "x-accel-buffering": "no", // nginx: do not buffer the stream
};

function send(res: ServerResponse, status: number, body: JsonValue | ErrorBody): void {
  res.writeHead(status, { "content-type": "application/json; charset=utf-8", "cache-control": "no-store" });
  res.end(JSON.stringify(body));
}

async function readJson(req: IncomingMessage): Promise<JsonObject> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > 1 << 20) throw new BffError(413, "resource_exhausted", "BODY_TOO_LARGE", "body too large (1 MiB at most)");
    chunks.push(chunk as Buffer);
  }
  if (!chunks.length) return {};
  try {
    const parsed: unknown = JSON.parse(Buffer.concat(chunks).toString("utf8"));
    if (parsed && typeof parsed === "object" && !Array.isArray(parsed)) return parsed as JsonObject;
  } catch {
    // not JSON: the 400 below says so
  }
  throw new BffError(400, "invalid_argument", "INVALID_BODY", "body must be a JSON object");
}

/** proto3 JSON of `schema`; a malformed body is a 400 with the parser's words. */
function parse<D extends DescMessage>(schema: D, json: JsonObject): MessageShape<D> {
  try {
    return fromJson(schema, json);
  } catch (err) {
    throw new BffError(400, "invalid_argument", "INVALID_BODY", (err as Error).message);
  }
}

interface Ctx {
  ep: Entrepot;
  feed: StockFeed;
  req: IncomingMessage;
  res: ServerResponse;
  url: URL;
  params: Record<string, string>;
  /** The Idempotency-Key header (or a fresh one) as request_id; mutating routes only. */
  requestId: string;
}

/** A JSON reply (the status defaults to 200), or undefined when the handler answered itself. */
type Reply = { status?: number; body: JsonValue } | undefined;
type Handler = (c: Ctx) => Promise<Reply>;

const ok = <D extends DescMessage>(schema: D, msg: MessageShape<D>, status = 200): Reply => ({
  status,
  body: toJson(schema, msg, JSON_STYLE),
});

/** The request body with the path's ids and the idempotency key on top. */
async function body(c: Ctx, extra: JsonObject = {}): Promise<JsonObject> {
  return { ...(await readJson(c.req)), cartId: c.params.id ?? "", ...extra, requestId: c.requestId };
}

const ROUTES: [string, string, Handler][] = [
  ["GET", "/", async ({ res }) => serveFile(res, new URL("../../bff/web/index.html", import.meta.url), "text/html")],
  ["GET", "/app.js", async ({ res }) => serveFile(res, new URL("./web/app.js", import.meta.url), "text/javascript")],
  ["GET", "/channel", async ({ ep }) =>
    ok(ChannelSchema, await ep.channels.getChannel({ slug: ep.options.channel ?? "" }))],
  ["GET", "/stock/:sku", async ({ ep, params }) =>
    ok(SkuStockSchema, await ep.inventory.getStockLevel({ sku: params.sku }))],
  ["GET", "/stock/:sku/events", async ({ feed, req, res, url, params }) => {
    // The header (EventSource reconnecting) wins over the query (the page after a reload).
    const last = (req.headers["last-event-id"] as string | undefined) || url.searchParams.get("lastEventId") || undefined;
    await feed.subscribe(params.sku ?? "", last, res, () => res.writeHead(200, SSE_HEADERS));
    return undefined;
  }],
  ["POST", "/carts", async (c) => {
    const cart = (await readJson(c.req)) as JsonObject;
    return ok(CartSchema, await c.ep.carts.createCart(parse(CreateCartRequestSchema, { cart, requestId: c.requestId })), 201);
  }],
  ["GET", "/carts/:id", async ({ ep, params }) => ok(CartSchema, await ep.carts.getCart({ cartId: params.id }))],
  ["POST", "/carts/:id/lines", async (c) =>
    ok(CartSchema, await c.ep.carts.addCartLine(parse(AddCartLineRequestSchema, await body(c))))],
  ["PATCH", "/carts/:id/lines/:lineId", async (c) => {
    const input = await body(c);
    const line = input.line && typeof input.line === "object" && !Array.isArray(input.line) ? input.line : {};
    input.line = { ...line, lineId: c.params.lineId ?? "" };
    return ok(CartSchema, await c.ep.carts.updateCartLine(parse(UpdateCartLineRequestSchema, input)));
  }],
  ["DELETE", "/carts/:id/lines/:lineId", async (c) =>
    ok(CartSchema, await c.ep.carts.removeCartLine(parse(RemoveCartLineRequestSchema, await body(c, { lineId: c.params.lineId ?? "" }))))],
  ["POST", "/carts/:id/hold", async (c) =>
    ok(CartSchema, await c.ep.carts.holdCartStock(parse(HoldCartStockRequestSchema, await body(c))))],
  ["DELETE", "/carts/:id/hold", async (c) =>
    ok(CartSchema, await c.ep.carts.releaseCartHold(parse(ReleaseCartHoldRequestSchema, await body(c))))],
  ["POST", "/carts/:id/checkout", async (c) =>
    ok(CheckoutCartResponseSchema, await c.ep.carts.checkoutCart(parse(CheckoutCartRequestSchema, await body(c))))],
];

const METHODS = [...new Set(ROUTES.map(([m]) => m))].join(", ");

async function serveFile(res: ServerResponse, file: URL, type: string): Promise<Reply> {
  res.writeHead(200, { "content-type": `${type}; charset=utf-8`, "cache-control": "no-cache" });
  res.end(await readFile(file));
  return undefined;
}

function route(method: string, path: string): [Handler, Record<string, string>] | undefined {
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  for (const [m, pattern, handler] of ROUTES) {
    const want = pattern.split("/").filter(Boolean);
    if (m !== method || want.length !== parts.length) continue;
    const params: Record<string, string> = {};
    if (want.every((w, i) => (w.startsWith(":") ? ((params[w.slice(1)] = parts[i] ?? ""), true) : w === parts[i]))) {
      if (params.sku !== undefined) params.sku = params.sku.normalize("NFC"); // as Entrepot stores SKUs
      return [handler, params];
    }
  }
  return undefined;
}

/** CORS for `origin`: true when the request may go on (headers set), false when refused. */
function cors(req: IncomingMessage, res: ServerResponse, allowed: ReadonlySet<string>): boolean {
  const origin = req.headers.origin;
  if (!origin) return true;
  let host: string;
  try {
    host = new URL(origin).host;
  } catch {
    return false;
  }
  if (host === req.headers.host) return true; // the BFF's own page
  if (!allowed.has(origin)) return false;
  res.setHeader("access-control-allow-origin", origin);
  res.setHeader("access-control-expose-headers", "Idempotency-Key");
  res.setHeader("vary", "Origin");
  return true;
}

export interface BffOptions extends FeedOptions {
  allowedOrigins?: Iterable<string>;
}

export function createBff(ep: Entrepot, options: BffOptions = {}) {
  const allowed = new Set(options.allowedOrigins ?? []);
  const feed = new StockFeed(ep, options);
  const server = createServer((req, res) => {
    handle(ep, feed, allowed, req, res).catch((err: unknown) => {
      let error: ApiError;
      try {
        error = apiError(err);
      } catch {
        console.error(JSON.stringify({ bff: "unexpected error", method: req.method, path: req.url, error: String((err as Error)?.stack ?? err) }));
        error = apiError(new BffError(500, "internal", "INTERNAL", "the BFF failed; see its log"));
      }
      if (res.headersSent) res.destroy();
      else send(res, error.status, { error });
    });
  });
  return { server, feed };
}

async function handle(
  ep: Entrepot,
  feed: StockFeed,
  allowed: ReadonlySet<string>,
  req: IncomingMessage,
  res: ServerResponse,
): Promise<void> {
  const url = new URL(req.url ?? "/", "http://bff");
  const method = req.method ?? "GET";
  if (!cors(req, res, allowed)) {
    throw new BffError(403, "permission_denied", "ORIGIN_NOT_ALLOWED", `origin ${req.headers.origin} is not allowed`);
  }
  if (method === "OPTIONS") {
    // Preflight (only an allowed origin gets here with CORS headers set).
    res.writeHead(204, {
      "access-control-allow-methods": METHODS,
      "access-control-allow-headers": "Content-Type, Idempotency-Key, Last-Event-ID",
      "access-control-max-age": "600",
      vary: "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
    });
    res.end();
    return;
  }
  const found = route(method, url.pathname);
  if (!found) throw new BffError(404, "not_found", "NO_ROUTE", `no route for ${method} ${url.pathname}`);
  let requestId = "";
  if (method !== "GET") {
    requestId = (req.headers["idempotency-key"] as string | undefined) ?? randomUUID();
    res.setHeader("idempotency-key", requestId);
  }
  const [handler, params] = found;
  const reply = await handler({ ep, feed, req, res, url, params, requestId });
  if (reply) send(res, reply.status ?? 200, reply.body);
}

function intEnv(name: string, fallback: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === "") return fallback;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 0) {
    console.error(`${name} must be a whole number, got ${JSON.stringify(raw)}`);
    process.exit(2);
  }
  return n;
}

// Run as a program (node dist/bff/server.js), not when imported.
if (import.meta.url === `file://${process.argv[1]}`) {
  const target = process.env.ENTREPOT_TARGET ?? "127.0.0.1:50051";
  const token = process.env.ENTREPOT_TOKEN;
  if (!token) {
    console.error("ENTREPOT_TOKEN is required (mint one with `entrepot token`)");
    process.exit(2);
  }
  const ep = new Entrepot({ target, token, channel: process.env.ENTREPOT_CHANNEL, timeoutMs: intEnv("BFF_TIMEOUT_MS", 10_000) });
  const { server, feed } = createBff(ep, {
    allowedOrigins: (process.env.BFF_ALLOWED_ORIGINS ?? "").split(",").map((o) => o.trim()).filter(Boolean),
    heartbeatMs: intEnv("BFF_SSE_HEARTBEAT_MS", 15_000),
    buffer: intEnv("BFF_SSE_BUFFER", 10_000),
  });
  const watching = feed.run().catch((err: unknown) => {
    const { code, reason, message } = entrepotError(err);
    console.error(`the BFF cannot watch stock (${code} ${reason}): ${message}; its token needs inventory.watch`);
    process.exit(2);
  });
  server.listen(intEnv("BFF_PORT", 8080), process.env.BFF_HOST ?? "127.0.0.1", () => {
    const { address, port } = server.address() as AddressInfo;
    console.log(JSON.stringify({ listening: `http://${address}:${port}`, entrepot: target }));
  });
  const stop = () => {
    feed.stop();
    server.closeAllConnections();
    server.close(() => void watching.finally(() => { ep.close(); process.exit(0); }));
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}
