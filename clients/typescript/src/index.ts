// A small typed wrapper over Connect for Node: one HTTP/2 connection per Entrepot
// instance, speaking the gRPC protocol to Entrepot (no proxy needed; connect-node v2's
// gRPC transport is HTTP/2 only, so there is no httpVersion option to set), with the
// bearer token and the x-channel-slug header added to every call.
import type { DescService } from "@bufbuild/protobuf";
import { createClient, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

import { CartService } from "./gen/entrepot/cart/v1/cart_pb.js";
import { InventoryService } from "./gen/entrepot/inventory/v1/inventory_pb.js";
import { ChannelService } from "./gen/entrepot/platform/v1/channel_pb.js";

export { entrepotError } from "./errors.js";
export type { EntrepotErrorInfo, FieldViolation, PreconditionViolation } from "./errors.js";
export { InventoryService, ChannelService, CartService };

export interface EntrepotOptions {
  /** "host:port" (plaintext HTTP/2) or a full "http://" / "https://" URL. */
  target: string;
  /** Bearer JWT (claims sub, permissions, channels). */
  token: string;
  /** Sales channel slug sent as x-channel-slug; required by channel-scoped RPCs. */
  channel?: string;
  /** Default deadline for unary calls, in milliseconds (streams have none). Default 10 s. */
  timeoutMs?: number;
}

/** Adds `authorization: Bearer <token>` and `x-channel-slug` to every request. */
export function entrepotHeaders(token: string, channel?: string): Interceptor {
  return (next) => async (req) => {
    req.header.set("authorization", `Bearer ${token}`);
    if (channel) req.header.set("x-channel-slug", channel);
    return next(req);
  };
}

/** A deadline for unary calls only: streams (WatchStockChanges) stay open as long as wanted. */
function unaryDeadline(timeoutMs: number): Interceptor {
  return (next) => async (req) => {
    if (req.stream || req.signal.aborted) return next(req);
    const timeout = AbortSignal.timeout(timeoutMs);
    return next({ ...req, signal: AbortSignal.any([req.signal, timeout]) });
  };
}

function baseUrl(target: string): string {
  return /^https?:\/\//.test(target) ? target : `http://${target}`;
}

export class Entrepot {
  readonly transport: Transport;
  readonly inventory: Client<typeof InventoryService>;
  readonly channels: Client<typeof ChannelService>;
  readonly carts: Client<typeof CartService>;
  private readonly session: Http2SessionManager;
  private readonly clients = new Map<string, unknown>();

  constructor(readonly options: EntrepotOptions, session?: Http2SessionManager) {
    const url = baseUrl(options.target);
    this.session = session ?? new Http2SessionManager(url);
    this.transport = createGrpcTransport({
      baseUrl: url,
      sessionManager: this.session,
      interceptors: [unaryDeadline(options.timeoutMs ?? 10_000), entrepotHeaders(options.token, options.channel)],
    });
    this.inventory = this.client(InventoryService);
    this.channels = this.client(ChannelService);
    this.carts = this.client(CartService);
  }

  /** A typed client for any generated service (order, refund, ...), on this connection. */
  client<S extends DescService>(service: S): Client<S> {
    let c = this.clients.get(service.typeName) as Client<S> | undefined;
    if (!c) {
      c = createClient(service, this.transport);
      this.clients.set(service.typeName, c);
    }
    return c;
  }

  /** The same connection with another token or channel (a BFF serving several storefronts). */
  with(overrides: Partial<Pick<EntrepotOptions, "token" | "channel">>): Entrepot {
    return new Entrepot({ ...this.options, ...overrides }, this.session);
  }

  /** Closes the HTTP/2 connection (pending calls fail). */
  close(): void {
    this.session.abort();
  }
}
