// A tiny BFF (backend for frontend): plain node:http, JSON in and out, calling Entrepot
// over gRPC with the typed client. Endpoints:
//   GET  /stock/:sku                     stock level (GetStockLevel)
//   POST /carts                          {"customerRef": "..."} -> cart (CreateCart)
//   GET  /carts/:id                      cart (GetCart)
//   POST /carts/:id/lines                {"version": "1", "line": {"sku", "quantity", "unitPrice": {...}}} (AddCartLine)
//   POST /carts/:id/checkout             {"version": "2", "payments": [...]} -> order (CheckoutCart)
// Cart bodies are the proto3 JSON of the CartService requests (camelCase; int64 as strings);
// cart_id comes from the path and request_id from the Idempotency-Key header (or a fresh one).
// Env: ENTREPOT_TARGET (host:port), ENTREPOT_TOKEN (the BFF's service token),
// ENTREPOT_CHANNEL (default sales channel; `?channel=` overrides), BFF_PORT (0 = any).
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import { randomUUID } from "node:crypto";
import type { AddressInfo } from "node:net";
import { fromJson, toJson, type DescMessage, type JsonValue, type MessageShape } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";

import { Entrepot, entrepotError } from "../src/index.js";
import {
  AddCartLineRequestSchema,
  CartSchema,
  CheckoutCartRequestSchema,
  CheckoutCartResponseSchema,
} from "../src/gen/entrepot/cart/v1/cart_pb.js";

const HTTP_STATUS: Partial<Record<Code, number>> = {
  [Code.InvalidArgument]: 400,
  [Code.OutOfRange]: 400,
  [Code.Unauthenticated]: 401,
  [Code.PermissionDenied]: 403,
  [Code.NotFound]: 404,
  [Code.AlreadyExists]: 409,
  [Code.Aborted]: 409,
  [Code.FailedPrecondition]: 409,
  [Code.ResourceExhausted]: 429,
  [Code.Unimplemented]: 501,
  [Code.Unavailable]: 503,
  [Code.DeadlineExceeded]: 504,
};

class HttpError extends Error {
  constructor(readonly status: number, message: string) {
    super(message);
  }
}

function send(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify(body));
}

async function readJson(req: IncomingMessage): Promise<Record<string, JsonValue>> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > 1 << 20) throw new HttpError(413, "body too large");
    chunks.push(chunk as Buffer);
  }
  if (!chunks.length) return {};
  try {
    const parsed: unknown = JSON.parse(Buffer.concat(chunks).toString("utf8"));
    if (parsed && typeof parsed === "object" && !Array.isArray(parsed)) return parsed as Record<string, JsonValue>;
  } catch {
    // fall through to the 400 below
  }
  throw new HttpError(400, "body must be a JSON object");
}

/** The request body as proto3 JSON of `schema`; a malformed body is a 400, not a 500. */
function parse<D extends DescMessage>(schema: D, json: JsonValue): MessageShape<D> {
  try {
    return fromJson(schema, json);
  } catch (err) {
    throw new HttpError(400, (err as Error).message);
  }
}

export function createBff(base: Entrepot, defaultChannel?: string) {
  return createServer((req, res) => {
    handle(base, defaultChannel, req, res).catch((err: unknown) => {
      if (err instanceof HttpError) return send(res, err.status, { error: { message: err.message } });
      const info = entrepotError(err);
      const code = ConnectError.from(err).code;
      send(res, HTTP_STATUS[code] ?? 502, { error: info });
    });
  });
}

async function handle(
  base: Entrepot,
  defaultChannel: string | undefined,
  req: IncomingMessage,
  res: ServerResponse,
): Promise<void> {
  const url = new URL(req.url ?? "/", "http://bff");
  const channel = url.searchParams.get("channel") ?? defaultChannel;
  const ep = base.with({ channel });
  const parts = url.pathname.split("/").filter(Boolean).map(decodeURIComponent);

  if (req.method === "GET" && parts[0] === "stock" && parts.length === 2) {
    const s = await ep.inventory.getStockLevel({ sku: parts[1] });
    // Web clients get plain numbers: stock counts are far below 2^53.
    return send(res, 200, {
      sku: s.sku,
      available: Number(s.available),
      onHand: Number(s.onHand),
      reserved: Number(s.reserved),
      inStock: s.available > 0n,
      warehouses: s.warehouses.map((w) => ({ code: w.warehouseCode, available: Number(w.available) })),
    });
  }

  if (parts[0] === "carts") {
    // An Idempotency-Key header makes a retried POST the same mutation (request_id).
    const requestId = (req.headers["idempotency-key"] as string | undefined) ?? randomUUID();
    if (req.method === "POST" && parts.length === 1) {
      const body = await readJson(req);
      const cart = await ep.carts.createCart({ cart: { customerRef: String(body.customerRef ?? "") }, requestId });
      return send(res, 201, toJson(CartSchema, cart));
    }
    const cartId = parts[1] ?? "";
    if (req.method === "GET" && parts.length === 2) {
      return send(res, 200, toJson(CartSchema, await ep.carts.getCart({ cartId })));
    }
    if (req.method === "POST" && parts.length === 3 && parts[2] === "lines") {
      const input = parse(AddCartLineRequestSchema, { ...(await readJson(req)), cartId, requestId });
      return send(res, 200, toJson(CartSchema, await ep.carts.addCartLine(input)));
    }
    if (req.method === "POST" && parts.length === 3 && parts[2] === "checkout") {
      const input = parse(CheckoutCartRequestSchema, { ...(await readJson(req)), cartId, requestId });
      return send(res, 200, toJson(CheckoutCartResponseSchema, await ep.carts.checkoutCart(input)));
    }
  }
  throw new HttpError(404, `no route for ${req.method} ${url.pathname}`);
}

// Run as a program (node dist/bff/server.js), not when imported.
if (import.meta.url === `file://${process.argv[1]}`) {
  const target = process.env.ENTREPOT_TARGET ?? "127.0.0.1:50051";
  const token = process.env.ENTREPOT_TOKEN;
  if (!token) {
    console.error("ENTREPOT_TOKEN is required (mint one with `entrepot token`)");
    process.exit(2);
  }
  const ep = new Entrepot({ target, token });
  const server = createBff(ep, process.env.ENTREPOT_CHANNEL);
  server.listen(Number(process.env.BFF_PORT ?? "8080"), "127.0.0.1", () => {
    const { port } = server.address() as AddressInfo;
    console.log(JSON.stringify({ listening: `http://127.0.0.1:${port}`, entrepot: target }));
  });
  const stop = () => server.close(() => { ep.close(); process.exit(0); });
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}
