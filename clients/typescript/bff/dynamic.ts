// Services the BFF calls by name, with proto3 JSON in and out. A service whose generated
// module is not in this build (CartService lands with its own proto) resolves to null, so
// the BFF answers 501 for its routes instead of failing to start.
import { fromJson, toJson, type DescService, type JsonValue, type Message } from "@bufbuild/protobuf";

import type { Entrepot } from "../src/index.js";

const MODULES: Record<string, string> = {
  "entrepot.cart.v1.CartService": "../src/gen/entrepot/cart/v1/cart_pb.js",
};

const cache = new Map<string, DescService | null>();

export async function loadService(typeName: string): Promise<DescService | null> {
  if (cache.has(typeName)) return cache.get(typeName) ?? null;
  let found: DescService | null = null;
  const path = MODULES[typeName];
  if (path) {
    try {
      const mod = (await import(path)) as Record<string, unknown>;
      const name = typeName.split(".").pop() ?? "";
      found = (mod[name] as DescService | undefined) ?? null;
    } catch (err) {
      if ((err as { code?: string }).code !== "ERR_MODULE_NOT_FOUND") throw err;
    }
  }
  cache.set(typeName, found);
  return found;
}

export async function callJson(ep: Entrepot, service: DescService, method: string, body: JsonValue): Promise<JsonValue> {
  const m = service.methods.find((x) => x.name === method);
  if (!m || m.methodKind !== "unary") throw new Error(`${service.typeName}/${method} is not a unary method`);
  const client = ep.client(service) as unknown as Record<string, (req: unknown) => Promise<Message>>;
  const call = client[m.localName];
  if (!call) throw new Error(`no client method ${m.localName}`);
  const res = await call.call(client, fromJson(m.input, body));
  return toJson(m.output, res);
}
