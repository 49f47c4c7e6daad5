// The browser half of tests/e2e/test_bff_browser.py: Debian's headless Chromium driven by
// playwright-core against the real BFF and Entrepot. Stock changes go through the gRPC API
// (the typed client with an admin token). Prints one JSON line per step on stdout; Python
// checks them and answers "go" on stdin where it checks the server side. Exits 1 with the
// failed step's message.
import { createInterface } from "node:readline";
import { randomUUID } from "node:crypto";
import { chromium, type Browser, type Page } from "playwright-core";

import { Entrepot } from "../src/index.js";

const env = (name: string): string => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is required`);
  return v;
};
const BFF = env("BFF_URL");
const CROSS_ORIGIN = env("CROSS_ORIGIN"); // the BFF under another name (an allowed origin)
const SKU = env("SKU");
const SHORT_SKU = env("SHORT_SKU");
const WH_A = env("WH_A");
const WH_B = env("WH_B");
const ARTIFACTS = env("ARTIFACTS");

const stdin = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const out = (step: string, data: Record<string, unknown> = {}) => process.stdout.write(JSON.stringify({ step, ...data }) + "\n");

async function textIs(page: Page, selector: string, want: string, timeout = 5_000): Promise<void> {
  try {
    await page.waitForFunction(
      ([sel, text]) => document.querySelector(sel!)?.textContent === text,
      [selector, want] as const,
      { timeout },
    );
  } catch {
    const got = await page.locator(selector).first().textContent({ timeout: 100 }).catch(() => null);
    throw new Error(`${selector}: wanted ${JSON.stringify(want)} within ${timeout} ms, saw ${JSON.stringify(got)}`);
  }
}

const level = (wh: string, col: string) => `#stock tr[data-warehouse="${wh}"] .${col}`;
const changeIds = (page: Page) => page.$$eval("#changes li", (lis) => lis.map((li) => (li as HTMLElement).dataset.eventId ?? ""));

async function openShop(browser: Browser, sku: string): Promise<Page> {
  const page = await browser.newPage({ viewport: { width: 1200, height: 760 } });
  page.on("pageerror", (err) => out("page_error", { message: err.message }));
  await page.goto(`${BFF}/?sku=${encodeURIComponent(sku)}`);
  await page.waitForSelector('body[data-ready="true"]');
  await page.waitForSelector('#live[data-state="live"]');
  return page;
}

async function main(): Promise<void> {
  const ep = new Entrepot({ target: env("ENTREPOT_TARGET"), token: env("ENTREPOT_TOKEN"), channel: env("ENTREPOT_CHANNEL") });
  const adjust = (sku: string, wh: string, delta: number, reason: string) =>
    ep.inventory.adjustStock({ sku, warehouseCode: wh, delta: BigInt(delta), reason, requestId: randomUUID() });
  const browser = await chromium.launch({ executablePath: env("CHROMIUM_PATH"), headless: true });
  try {
    // 1. Open the page and see the stock per warehouse.
    const page = await openShop(browser, SKU);
    await textIs(page, level(WH_A, "on-hand"), "7");
    await textIs(page, level(WH_B, "on-hand"), "3");
    await textIs(page, "#total-available", "10");
    out("stock", { mode: await page.getAttribute("#stream", "data-mode") });

    // 2. Change stock through the gRPC API: the page shows it within 2 s.
    const t0 = Date.now();
    await adjust(SKU, WH_A, 5, "delivery");
    await textIs(page, level(WH_A, "on-hand"), "12", 2_000);
    out("live", { ms: Date.now() - t0 });

    // A second tab on the same SKU: Python checks the BFF still has one watch.
    const tab2 = await openShop(browser, SKU);
    await textIs(tab2, "#total-on-hand", "15");
    out("tabs", { tabs: 2 });
    await stdin.next();
    await tab2.close();

    // 3. Leave mid-stream, miss two changes, come back: resumed from the kept cursor, each
    // missed change exactly once; then a plain reload.
    const before = await changeIds(page);
    // Leave for a page of the same origin without the app: this tab's kept cursor stays put.
    await page.goto(`${BFF}/channel`);
    const cursor = await page.evaluate((k) => JSON.parse(sessionStorage.getItem(k) ?? "{}").cursor as string, `entrepot.stock.${SKU}`);
    await adjust(SKU, WH_B, -1, "gap 1");
    await adjust(SKU, WH_A, 2, "gap 2");
    await page.goto(`${BFF}/?sku=${encodeURIComponent(SKU)}`);
    await textIs(page, level(WH_A, "on-hand"), "14");
    await textIs(page, level(WH_B, "on-hand"), "2");
    const resumed = { mode: await page.getAttribute("#stream", "data-mode"), after: await page.getAttribute("#stream", "data-cursor") };
    await page.reload();
    await page.waitForSelector('#live[data-state="live"]');
    await adjust(SKU, WH_B, 4, "after reload");
    await textIs(page, level(WH_B, "on-hand"), "6", 2_000);
    out("resume", { cursor, resumed, before, after: await changeIds(page), reloadMode: await page.getAttribute("#stream", "data-mode") });

    // 4. Cart: add, hold (the hold shows up in the live stock), checkout, see the order id.
    await page.fill("#qty", "2");
    await page.click("#add button");
    await textIs(page, '#lines tr[data-sku] .qty', "2");
    await page.click("#hold-btn");
    await textIs(page, "#hold", "held");
    await textIs(page, "#total-reserved", "2", 2_000);
    await page.click("#checkout-btn");
    await page.waitForSelector("#order:not([hidden])");
    await textIs(page, "#cart-state", "converted");
    out("order", { orderId: await page.textContent("#order-id"), reserved: await page.textContent("#total-reserved") });
    await page.screenshot({ path: `${ARTIFACTS}/bff-page-order.png`, fullPage: true });

    // 5. A stale cart version (the cart changed on another device) gets the words for it.
    await page.click("#new-cart");
    await page.fill("#qty", "1");
    await page.click("#add button");
    await textIs(page, "#version", "2");
    const cartId = await page.evaluate(() => sessionStorage.getItem("entrepot.cart"));
    const other = await fetch(`${BFF}/carts/${cartId}/hold`, {
      method: "POST",
      headers: { "content-type": "application/json", "idempotency-key": randomUUID() },
      body: JSON.stringify({ version: "2" }),
    });
    if (other.status !== 200) throw new Error(`hold from another device: ${other.status} ${await other.text()}`);
    await page.click("#add button");
    await page.waitForSelector('#message[data-reason="CART_VERSION_MISMATCH"]');
    await textIs(page, "#version", "3"); // the page re-read the cart
    out("stale", { message: await page.textContent("#message") });

    // 6. Short stock: the last unit goes while it sits in the cart; checkout says so.
    const shop = await openShop(browser, SHORT_SKU);
    await textIs(shop, "#total-available", "1");
    await shop.click("#add button");
    await textIs(shop, '#lines tr[data-sku] .qty', "1");
    await ep.inventory.setStock({ sku: SHORT_SKU, warehouseCode: WH_A, quantity: 0n, reason: "breakage", requestId: randomUUID() });
    await textIs(shop, "#total-available", "0", 2_000);
    await shop.click("#checkout-btn");
    await shop.waitForSelector('#message[data-reason="INSUFFICIENT_STOCK"]');
    const shot = `${ARTIFACTS}/bff-page-short-stock.png`;
    await shop.screenshot({ path: shot, fullPage: true });
    out("short", { message: await shop.textContent("#message"), orderShown: await shop.isVisible("#order"), screenshot: shot });

    // 7. CORS in the browser: a page on an allowed origin calls the BFF (preflighted POST with
    // an Idempotency-Key), and a credentialed call is refused by the browser itself.
    const foreign = await browser.newPage();
    await foreign.goto(`${CROSS_ORIGIN}/channel`);
    const cors = await foreign.evaluate(async (bff) => {
      const init = { method: "POST", headers: { "content-type": "application/json", "idempotency-key": crypto.randomUUID() }, body: JSON.stringify({ customerRef: "cors" }) };
      const res = await fetch(`${bff}/carts`, init);
      const credentialed = await fetch(`${bff}/channel`, { credentials: "include" }).then(() => "allowed", () => "refused");
      return { origin: location.origin, status: res.status, key: res.headers.get("idempotency-key"), credentialed };
    }, BFF);
    out("cors", cors);
    out("done");
  } finally {
    await browser.close();
    ep.close();
  }
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    console.error(err instanceof Error ? err.message : String(err));
    process.exit(1);
  },
);
