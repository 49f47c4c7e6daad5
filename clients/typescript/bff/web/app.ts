// The demo page's script (served as /app.js; no framework, no imports at run time).
// Stock of ?sku= live over SSE, resumed after a reload from the cursor kept in
// sessionStorage; a cart (id kept per tab) with add, hold and checkout; errors shown in
// words chosen from the ErrorInfo reason.
import type { ApiError, Cart, CheckoutResult, Channel, ErrorBody, Stock, StockChangeEvent, StockChanges } from "../api.js";

const $ = <T extends HTMLElement = HTMLElement>(sel: string): T => {
  const el = document.querySelector<T>(sel);
  if (!el) throw new Error(`missing ${sel}`);
  return el;
};

const sku = new URLSearchParams(location.search).get("sku") ?? "";
const STREAM_KEY = `entrepot.stock.${sku}`;
const CART_KEY = "entrepot.cart";

// ------------------------------------------------------------------ stock
interface Level {
  onHand: string;
  reserved: string;
  available: string;
  /** Newest ledger movement applied (0 from a snapshot): an older event never overwrites. */
  movementId: string;
}
interface StreamState {
  cursor: string;
  levels: Record<string, Level>;
  changes: string[][];
}

let stream: StreamState = JSON.parse(sessionStorage.getItem(STREAM_KEY) ?? "null") ?? { cursor: "", levels: {}, changes: [] };

function saveStream(): void {
  sessionStorage.setItem(STREAM_KEY, JSON.stringify(stream));
}

function renderStock(): void {
  const body = $("#stock tbody");
  body.replaceChildren();
  const total = { onHand: 0n, reserved: 0n, available: 0n };
  for (const code of Object.keys(stream.levels).sort()) {
    const l = stream.levels[code]!;
    const tr = document.createElement("tr");
    tr.dataset.warehouse = code;
    tr.append(cell(code), cell(l.onHand, "num on-hand"), cell(l.reserved, "num reserved"), cell(l.available, "num available"));
    body.append(tr);
    total.onHand += BigInt(l.onHand);
    total.reserved += BigInt(l.reserved);
    total.available += BigInt(l.available);
  }
  $("#total-on-hand").textContent = String(total.onHand);
  $("#total-reserved").textContent = String(total.reserved);
  $("#total-available").textContent = String(total.available);
  const list = $("#changes");
  list.replaceChildren(
    ...stream.changes.map(([id, text]) => {
      const li = document.createElement("li");
      li.dataset.eventId = id;
      li.textContent = text ?? "";
      return li;
    }),
  );
}

function cell(text: string, cls = ""): HTMLTableCellElement {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function apply(e: StockChangeEvent): void {
  const code = e.warehouseCode ?? "";
  const mine = stream.levels[code];
  if (!mine || BigInt(e.movementId ?? "0") > BigInt(mine.movementId)) {
    stream.levels[code] = { onHand: e.onHand ?? "0", reserved: e.reserved ?? "0", available: e.available ?? "0", movementId: e.movementId ?? "0" };
  }
  const before = BigInt(e.onHand ?? "0") - BigInt(e.onHandDelta ?? "0");
  stream.changes.push([
    e.eventId ?? "",
    `#${e.eventId} ${code}: on hand ${before} → ${e.onHand}, reserved ${e.reserved}, available ${e.available}` +
      (e.reason ? ` (${e.reason})` : ""),
  ]);
  stream.changes = stream.changes.slice(-50);
}

function streamInfo(mode: "snapshot" | "resumed", cursor: string): void {
  const el = $("#stream");
  el.dataset.mode = mode;
  el.dataset.cursor = cursor;
  el.textContent = mode === "resumed" ? `resumed after change ${cursor}` : `current levels${cursor ? ` at change ${cursor}` : ""}`;
}

function watchStock(): void {
  $("#sku").textContent = sku;
  renderStock();
  const url = new URL(`/stock/${encodeURIComponent(sku)}/events`, location.href);
  // After a reload: resume where this tab stopped (EventSource's own reconnects send Last-Event-ID).
  if (stream.cursor) url.searchParams.set("lastEventId", stream.cursor);
  const es = new EventSource(url);
  const live = $("#live");
  es.onopen = () => {
    live.dataset.state = "live";
    live.textContent = "live";
  };
  es.onerror = () => {
    live.dataset.state = "reconnecting";
    live.textContent = es.readyState === EventSource.CLOSED ? "stopped" : "reconnecting";
  };
  es.addEventListener("snapshot", (ev) => {
    const s = JSON.parse(ev.data) as Stock;
    stream.levels = {};
    for (const w of s.warehouses ?? []) {
      stream.levels[w.warehouseCode ?? ""] = { onHand: w.onHand ?? "0", reserved: w.reserved ?? "0", available: w.available ?? "0", movementId: "0" };
    }
    stream.cursor = ev.lastEventId;
    streamInfo("snapshot", ev.lastEventId);
    saveStream();
    renderStock();
  });
  es.addEventListener("resumed", (ev) => {
    stream.cursor = ev.lastEventId;
    streamInfo("resumed", ev.lastEventId);
    saveStream();
  });
  es.addEventListener("change", (ev) => {
    for (const e of (JSON.parse(ev.data) as StockChanges).events ?? []) apply(e);
    stream.cursor = ev.lastEventId;
    saveStream();
    renderStock();
  });
  es.addEventListener("heartbeat", (ev) => {
    stream.cursor = ev.lastEventId;
    saveStream();
  });
}

// ------------------------------------------------------------------ money
let currency = "EUR";
const digits = () => new Intl.NumberFormat("en", { style: "currency", currency }).resolvedOptions().maximumFractionDigits ?? 2;

/** "12.50" -> "1250" minor units (exact decimal arithmetic, no floats); undefined when malformed. */
function toMinor(text: string): string | undefined {
  const m = /^(\d+)(?:\.(\d+))?$/.exec(text.trim());
  const d = digits();
  if (!m || (m[2] ?? "").length > d) return undefined;
  return String(BigInt(m[1]! + (m[2] ?? "").padEnd(d, "0")));
}

function money(m: { amountMinor?: string; currencyCode?: string } | undefined): string {
  const d = digits();
  const minor = BigInt(m?.amountMinor ?? "0");
  const sign = minor < 0n ? "-" : "";
  const s = String(minor < 0n ? -minor : minor).padStart(d + 1, "0");
  return `${sign}${d ? `${s.slice(0, -d)}.${s.slice(-d)}` : s} ${m?.currencyCode || currency}`;
}

// ------------------------------------------------------------------ calls
class CallError extends Error {
  constructor(readonly info: ApiError) {
    super(info.message);
  }
}

/** One user action = one Idempotency-Key: a retry after a lost answer or a 503 is the same mutation. */
async function call<T>(method: string, path: string, body?: unknown): Promise<T> {
  const headers: Record<string, string> = { "content-type": "application/json" };
  if (method !== "GET") headers["idempotency-key"] = crypto.randomUUID();
  for (let attempt = 1; ; attempt++) {
    let res: Response;
    try {
      res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (err) {
      if (attempt < 3) continue;
      throw err;
    }
    if ((res.status === 503 || res.status === 504) && attempt < 3) {
      await new Promise((r) => setTimeout(r, 200 * attempt));
      continue;
    }
    const json: unknown = await res.json();
    if (!res.ok) throw new CallError((json as ErrorBody).error);
    return json as T;
  }
}

/** What a shopper should read, chosen by the ErrorInfo reason. */
function sayError(e: ApiError): string {
  const shortages = e.preconditionViolations.map((v) => `${v.subject}: ${v.description}`).join("; ");
  switch (e.reason) {
    case "INSUFFICIENT_STOCK":
      return `Sorry, there is not enough stock left for your cart (${shortages}). Lower the quantity and try again.`;
    case "CART_VERSION_MISMATCH":
      return "Your cart was changed in another tab or device. We reloaded it: check it and try again.";
    case "CART_CONVERTED":
      return "This cart has already been checked out. Start a new cart to keep shopping.";
    case "CART_LOCKED":
      return "This cart is waiting for approval and cannot be changed now.";
    case "PURCHASE_LIMIT_EXCEEDED":
      return `This exceeds a purchase limit (${shortages}).`;
    case "CART_EMPTY":
      return "Your cart is empty.";
    default:
      return e.status >= 500 ? "Something went wrong on our side. Please try again in a moment." : `Sorry, that did not work: ${e.message}`;
  }
}

// ------------------------------------------------------------------ cart
let cart: Cart | undefined;

function renderCart(): void {
  const body = $("#lines tbody");
  body.replaceChildren(
    ...(cart?.lines ?? []).map((l) => {
      const tr = document.createElement("tr");
      tr.dataset.sku = l.sku ?? "";
      tr.append(cell(l.lineId ?? ""), cell(l.sku ?? ""), cell(l.quantity ?? "", "num qty"), cell(money(l.lineTotal), "num"));
      return tr;
    }),
  );
  $("#subtotal").textContent = cart ? money(cart.subtotal) : "-";
  $("#cart-state").textContent = cart?.state?.replace("STATE_", "").toLowerCase() ?? "-";
  $("#hold").textContent = cart?.hold?.state?.replace("STATE_", "").toLowerCase() ?? "-";
  $("#version").textContent = cart?.version ?? "-";
  if (cart?.id) sessionStorage.setItem(CART_KEY, cart.id);
}

async function act(fn: () => Promise<void>): Promise<void> {
  const message = $("#message");
  message.textContent = "";
  delete message.dataset.reason;
  try {
    await fn();
  } catch (err) {
    if (!(err instanceof CallError)) {
      message.textContent = "We could not reach the shop. Check your connection and try again.";
      return;
    }
    message.textContent = sayError(err.info);
    message.dataset.reason = err.info.reason;
    if (err.info.reason === "CART_VERSION_MISMATCH" && cart?.id) {
      cart = await call<Cart>("GET", `/carts/${cart.id}`);
      renderCart();
    }
  }
  renderCart();
}

async function addToCart(): Promise<void> {
  const quantity = $<HTMLInputElement>("#qty").value;
  const unit = toMinor($<HTMLInputElement>("#price").value);
  if (!unit) throw new CallError({ status: 400, code: "invalid_argument", reason: "", message: "the unit price must look like 12.50", domain: "page", metadata: {}, fieldViolations: [], preconditionViolations: [] });
  if (!cart || cart.state === "STATE_CONVERTED") {
    cart = await call<Cart>("POST", "/carts", { customerRef: customerRef() });
  }
  const line = cart.lines?.find((l) => l.sku === sku);
  if (line) {
    const qty = String(BigInt(line.quantity ?? "0") + BigInt(quantity));
    cart = await call<Cart>("PATCH", `/carts/${cart.id}/lines/${line.lineId}`, { version: cart.version, line: { quantity: qty }, updateMask: "quantity" });
  } else {
    const unitPrice = { currencyCode: currency, amountMinor: unit };
    cart = await call<Cart>("POST", `/carts/${cart.id}/lines`, { version: cart.version, line: { sku, quantity, unitPrice } });
  }
}

function customerRef(): string {
  let ref = localStorage.getItem("entrepot.customer");
  if (!ref) localStorage.setItem("entrepot.customer", (ref = `web-${crypto.randomUUID().slice(0, 8)}`));
  return ref;
}

async function main(): Promise<void> {
  watchStock();
  currency = (await call<Channel>("GET", "/channel")).currency || currency;
  const saved = sessionStorage.getItem(CART_KEY);
  if (saved) await act(async () => void (cart = await call<Cart>("GET", `/carts/${saved}`)));
  renderCart();
  $("#add").addEventListener("submit", (ev) => {
    ev.preventDefault();
    void act(addToCart);
  });
  $("#hold-btn").addEventListener("click", () =>
    void act(async () => {
      if (!cart) return;
      cart = await call<Cart>("POST", `/carts/${cart.id}/hold`, { version: cart.version, ttl: "900s" });
    }),
  );
  $("#checkout-btn").addEventListener("click", () =>
    void act(async () => {
      if (!cart) return;
      const payments = [{ tenderId: "card-1", method: "card", captured: cart.subtotal }];
      const done = await call<CheckoutResult>("POST", `/carts/${cart.id}/checkout`, { version: cart.version, payments });
      cart = done.cart;
      $("#order-id").textContent = done.orderId ?? "";
      $("#order").hidden = false;
    }),
  );
  $("#new-cart").addEventListener("click", () => {
    cart = undefined;
    sessionStorage.removeItem(CART_KEY);
    $("#order").hidden = true;
    $("#message").textContent = "";
    renderCart();
  });
  document.body.dataset.ready = "true";
}

void main();
