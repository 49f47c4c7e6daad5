// Live stock for browsers: ONE WatchStockChanges stream per BFF process (all SKUs), fanned
// out to every server-sent-events connection, filtered by SKU here.
//
// Every message of the watch is kept in a ring buffer (BFF_SSE_BUFFER messages) in delivery
// order, indexed by its cursor, so a browser resuming with Last-Event-ID = a cursor gets the
// buffered messages after it, for its SKU, and then the live ones: nothing lost or repeated.
// Cursors are compared by their place in the stream, never numerically (the server orders
// by commit, not by event id). A resume point the buffer no longer holds (the BFF restarted,
// or the browser was away too long) gets a fresh snapshot instead.
import type { ServerResponse } from "node:http";
import { toJson, type JsonValue } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";

import { entrepotError, type Entrepot } from "../src/index.js";
import {
  SkuStockSchema,
  WatchStockChangesResponseSchema,
  type StockChangeEvent,
  type WatchStockChangesResponse,
} from "../src/gen/entrepot/inventory/v1/inventory_pb.js";
import type { StockStreamEvent } from "./api.js";

/** The one JSON style (bff/api.ts): proto3 JSON with zero values emitted. */
export const JSON_STYLE = { alwaysEmitImplicit: true } as const;

interface Entry {
  seq: number;
  cursor: string;
  events: StockChangeEvent[];
}

export interface FeedOptions {
  /** Messages kept for resuming (default 10,000). */
  buffer?: number;
  /** SSE heartbeat period in ms (default 15,000). */
  heartbeatMs?: number;
  /** Bytes a slow browser may have unread before the BFF drops it (it reconnects and resumes). */
  maxUnsentBytes?: number;
  log?: (line: Record<string, unknown>) => void;
}

class Subscriber {
  /** Newest cursor this browser has passed (sent or filtered out); undefined before the first. */
  cursor: string | undefined;
  /** Messages that arrived while the snapshot was being read; sent after it. */
  pending: Entry[] | undefined = [];

  constructor(
    readonly sku: string,
    readonly res: ServerResponse,
    private readonly maxUnsentBytes: number,
  ) {}

  send(event: StockStreamEvent, id: string | undefined, data: JsonValue): void {
    let frame = `event: ${event}\n`;
    if (id !== undefined) frame += `id: ${id}\n`;
    frame += `data: ${JSON.stringify(data)}\n\n`;
    this.res.write(frame);
    // A browser that stopped reading: drop it, it reconnects with Last-Event-ID.
    if (this.res.writableLength > this.maxUnsentBytes) this.res.destroy();
  }

  deliver(entry: Entry): void {
    if (this.pending) {
      this.pending.push(entry);
      return;
    }
    this.cursor = entry.cursor;
    const events = entry.events.filter((e) => e.sku === this.sku);
    if (events.length) this.sendChanges("change", entry.cursor, events);
  }

  sendChanges(event: StockStreamEvent, cursor: string, events: StockChangeEvent[]): void {
    const msg: WatchStockChangesResponse = { $typeName: "entrepot.inventory.v1.WatchStockChangesResponse", cursor: BigInt(cursor), events };
    this.send(event, cursor, toJson(WatchStockChangesResponseSchema, msg, JSON_STYLE));
  }
}

export class StockFeed {
  private readonly entries: Entry[] = [];
  private readonly seqOf = new Map<string, number>();
  private seq = 0;
  private readonly subs = new Set<Subscriber>();
  private readonly abort = new AbortController();
  private readonly heartbeat: NodeJS.Timeout;
  private readonly buffer: number;
  private readonly maxUnsentBytes: number;
  private readonly log: (line: Record<string, unknown>) => void;
  /** Newest cursor of the watch (undefined until its first message). */
  cursor: string | undefined;

  constructor(
    private readonly ep: Entrepot,
    options: FeedOptions = {},
  ) {
    this.buffer = options.buffer ?? 10_000;
    this.maxUnsentBytes = options.maxUnsentBytes ?? 1 << 20;
    this.log = options.log ?? ((line) => console.error(JSON.stringify(line)));
    this.heartbeat = setInterval(() => this.beat(), options.heartbeatMs ?? 15_000);
  }

  /**
   * Runs the watch until stop(): reconnects from the last cursor after a failure. A token
   * that may not watch is the BFF's misconfiguration: thrown, not retried.
   */
  async run(): Promise<void> {
    let backoff = 250;
    while (!this.abort.signal.aborted) {
      try {
        const stream = this.ep.inventory.watchStockChanges(
          { afterEventId: BigInt(this.cursor ?? "0") },
          { signal: this.abort.signal },
        );
        for await (const msg of stream) {
          this.push(msg);
          backoff = 250;
        }
      } catch (err) {
        if (this.abort.signal.aborted) return;
        const code = ConnectError.from(err).code;
        if (code === Code.PermissionDenied || code === Code.Unauthenticated) throw err;
        const info = entrepotError(err);
        this.log({ watch: "failed", code: info.code, reason: info.reason, cursor: this.cursor ?? null });
        if (code === Code.OutOfRange || code === Code.InvalidArgument) {
          // The cursor is gone (CURSOR_EXPIRED): watch from now; every browser re-reads the levels.
          this.restartFromNow();
        }
        await new Promise((r) => setTimeout(r, backoff));
        backoff = Math.min(backoff * 2, 5_000);
      }
    }
  }

  stop(): void {
    clearInterval(this.heartbeat);
    this.abort.abort();
    for (const s of this.subs) s.res.end();
  }

  private push(msg: WatchStockChangesResponse): void {
    const entry: Entry = { seq: ++this.seq, cursor: msg.cursor.toString(), events: msg.events };
    this.cursor = entry.cursor;
    this.entries.push(entry);
    this.seqOf.set(entry.cursor, entry.seq);
    while (this.entries.length > this.buffer) {
      const old = this.entries.shift();
      if (old && this.seqOf.get(old.cursor) === old.seq) this.seqOf.delete(old.cursor);
    }
    for (const s of this.subs) s.deliver(entry);
  }

  private restartFromNow(): void {
    this.entries.length = 0;
    this.seqOf.clear();
    this.cursor = undefined;
    for (const s of this.subs) s.res.end(); // they reconnect: snapshot
  }

  private beat(): void {
    for (const s of this.subs) {
      if (s.pending) continue;
      if (s.cursor === undefined) s.res.write(": heartbeat\n\n");
      else s.sendChanges("heartbeat", s.cursor, []);
    }
  }

  /** The buffered messages after `cursor`, or undefined when the buffer does not hold it. */
  private after(cursor: string): Entry[] | undefined {
    const seq = this.seqOf.get(cursor);
    if (seq === undefined) return undefined;
    const first = this.entries[0]?.seq ?? seq + 1;
    return this.entries.slice(seq - first + 1);
  }

  /**
   * Serves GET /stock/:sku/events on `res` until the browser goes. `lastEventId`: the
   * Last-Event-ID header, or the page's ?lastEventId= after a reload. `open` writes the
   * response head; a failure before it (an unknown SKU) is thrown for the error JSON.
   */
  async subscribe(sku: string, lastEventId: string | undefined, res: ServerResponse, open: () => void): Promise<void> {
    const sub = new Subscriber(sku, res, this.maxUnsentBytes);
    const start = () => {
      open();
      res.write("retry: 1000\n\n"); // EventSource reconnects after 1 s
    };
    // Resume: synchronous from lookup to joining the live feed, so nothing slips between.
    const missed = lastEventId ? this.after(lastEventId) : undefined;
    this.subs.add(sub);
    res.on("close", () => this.subs.delete(sub));
    if (lastEventId && missed) {
      start();
      sub.pending = undefined;
      sub.cursor = lastEventId;
      sub.sendChanges("resumed", lastEventId, []);
      for (const entry of missed) sub.deliver(entry);
      return;
    }
    // Fresh (or too old): the current levels, tagged with the cursor they are at least as
    // new as; what the watch delivers meanwhile is queued and sent after them.
    const at = this.cursor;
    let stock;
    try {
      stock = await this.ep.inventory.getStockLevel({ sku });
    } catch (err) {
      this.subs.delete(sub);
      throw err;
    }
    start();
    sub.send("snapshot", at ?? "", toJson(SkuStockSchema, stock, JSON_STYLE));
    sub.cursor = at;
    const queued = sub.pending ?? [];
    sub.pending = undefined;
    for (const entry of queued) sub.deliver(entry);
  }
}
