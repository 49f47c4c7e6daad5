// Interop probe run by tests/e2e/test_typescript_interop.py: the Node client against
// the Python server. Prints one JSON object per line on stdout:
//   {"step":"stock", ...}          GetStockLevel (unary)
//   {"step":"not_found", ...}      GetStockLevel of an unknown SKU (rich error details)
//   {"step":"event", ...}          each WatchStockChanges event for the SKU (server stream)
// and exits 0 after `expect` events. Usage:
//   ENTREPOT_TARGET=127.0.0.1:50051 ENTREPOT_TOKEN=... node dist/examples/interop.js SKU AFTER_EVENT_ID EXPECT
import { toJson } from "@bufbuild/protobuf";

import { Entrepot, entrepotError } from "../src/index.js";
import { SkuStockSchema, StockChangeEventSchema } from "../src/gen/entrepot/inventory/v1/inventory_pb.js";

function out(obj: unknown): void {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

async function main(): Promise<number> {
  const [sku, after, expect] = process.argv.slice(2);
  const target = process.env.ENTREPOT_TARGET;
  const token = process.env.ENTREPOT_TOKEN;
  if (!sku || !target || !token) {
    console.error("usage: ENTREPOT_TARGET=... ENTREPOT_TOKEN=... interop.js SKU [AFTER_EVENT_ID] [EXPECT]");
    return 2;
  }
  const ep = new Entrepot({ target, token, channel: process.env.ENTREPOT_CHANNEL });
  try {
    const stock = await ep.inventory.getStockLevel({ sku });
    out({ step: "stock", ...(toJson(SkuStockSchema, stock) as object) });

    try {
      await ep.inventory.getStockLevel({ sku: `${sku}-missing` });
      out({ step: "not_found", unexpected: "call succeeded" });
    } catch (err) {
      out({ step: "not_found", ...entrepotError(err) });
    }

    const want = Number(expect ?? "1");
    let seen = 0;
    const stream = ep.inventory.watchStockChanges({ skus: [sku], afterEventId: BigInt(after ?? "0") });
    for await (const msg of stream) {
      for (const e of msg.events) {
        out({ step: "event", cursor: msg.cursor.toString(), ...(toJson(StockChangeEventSchema, e) as object) });
        seen += 1;
      }
      if (seen >= want) break; // leaving the loop cancels the stream
    }
    return 0;
  } finally {
    ep.close();
  }
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(JSON.stringify(entrepotError(err)));
    process.exit(1);
  },
);
