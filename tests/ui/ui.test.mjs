// The on-call page in a real browser: Debian's chromium driven by playwright-core, against the
// real system tests/tests/ui.rs started (orchestrator, participants, Postgres, Kafka).
// Run by that test with: SAGA_URL, ADMIN_TOKEN, READ_TOKEN, DECLINED_ORDER (its order id),
// PARKED_SAGA (a NEEDS_ATTENTION saga id), SCREENSHOTS (a directory), CHROMIUM (the browser).
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";
import { chromium } from "playwright-core";

// AUTH_OFF=1: the system runs with AUTH_DISABLED, and only the test of that case runs.
const AUTH_OFF = !!process.env.AUTH_OFF;
const env = (name) => {
  const value = process.env[name];
  assert.ok(value || AUTH_OFF, `${name} is set`);
  return value;
};
const BASE = env("SAGA_URL");
const ADMIN = env("ADMIN_TOKEN");
const READER = env("READ_TOKEN");
const DECLINED_ORDER = env("DECLINED_ORDER");
const PARKED = env("PARKED_SAGA");
const SHOTS = env("SCREENSHOTS");
if (SHOTS) mkdirSync(SHOTS, { recursive: true });
/** The options of every test of the system with tokens. */
const withTokens = { skip: AUTH_OFF && "this run is the auth-off one" };

const AXE = readFileSync(createRequire(import.meta.url).resolve("axe-core/axe.min.js"), "utf8");

/** axe-core's WCAG 2.1 A and AA checks on the page as it is now: the violations, as text. */
async function accessibility(page) {
  await page.addScriptTag({ content: AXE });
  const result = await page.evaluate(() =>
    window.axe.run(document, { runOnly: { type: "tag", values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"] } }),
  );
  return result.violations.map((v) => `${v.id} (${v.impact}): ${v.nodes.map((n) => n.target.join(" ")).join(", ")}`);
}

let browser;
before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    // This machine's network is closed: no background connections, no first-run pages.
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
});
after(async () => {
  await browser?.close();
});

/** A new tab (its own sessionStorage), signed in with `token` unless null. */
async function tab(token, options = {}) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, ...options });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => m.type() === "error" && !/status of 40[13]/.test(m.text()) && errors.push(m.text()));
  page.errors = errors;
  if (token !== null) {
    await page.goto(`${BASE}/ui/`);
    await signIn(page, token);
  }
  return page;
}

async function signIn(page, token) {
  await page.getByLabel("API token").fill(token);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("navigation", { name: "Main" }).waitFor();
}

test("the overview shows the sample failures, each number a link to the list", withTokens, async () => {
  const page = await tab(ADMIN);
  const hour = page.getByRole("region", { name: "Last hour" });
  await hour.getByRole("table", { name: "Failures by code" }).getByText("PAYMENT_DECLINED").waitFor();
  const declined = hour.getByRole("table", { name: "Failures by code" }).getByRole("row", { name: /PAYMENT_DECLINED/ });
  assert.equal(await declined.getByRole("link").textContent(), "1");
  // The card shows "…" until its own query answers: wait for the count, not just the card.
  await page.getByRole("link", { name: /Need attention/ }).filter({ hasText: /^1\D/ }).waitFor();
  await page.screenshot({ path: join(SHOTS, "overview.png"), fullPage: true });
  await declined.getByRole("link").click();
  await page.waitForURL(/\/ui\/sagas\?failure_code=PAYMENT_DECLINED&window=1h/);
  await page.getByRole("link", { name: /…$/ }).first().waitFor();
  assert.deepEqual(page.errors, []);
});

test("FAILED + charge_payment finds the declined order; its page shows why and what was undone", withTokens, async () => {
  const page = await tab(ADMIN);
  await page.getByRole("link", { name: "Sagas", exact: true }).click();
  await page.getByRole("checkbox", { name: "FAILED" }).check();
  await page.getByLabel("Failed step").fill("charge_payment");
  await page.getByRole("button", { name: "Apply filters" }).click();
  await page.waitForURL(/status=FAILED/);
  const url = new URL(page.url());
  assert.deepEqual(url.searchParams.getAll("status"), ["FAILED"]);
  assert.equal(url.searchParams.get("failed_step"), "charge_payment");
  const rows = page.getByRole("table").getByRole("row").filter({ hasText: "PAYMENT_DECLINED" });
  await rows.first().waitFor();
  assert.equal(await rows.count(), 1);
  assert.match(await rows.first().textContent(), new RegExp(DECLINED_ORDER));
  await page.screenshot({ path: join(SHOTS, "list.png"), fullPage: true });

  // The filters survive a refresh: they are in the URL.
  await page.reload();
  await page.getByRole("table").getByRole("row").filter({ hasText: "PAYMENT_DECLINED" }).first().waitFor();
  assert.equal(await page.getByLabel("Failed step").inputValue(), "charge_payment");
  assert.ok(await page.getByRole("checkbox", { name: "FAILED" }).isChecked());

  await rows.first().getByRole("link").first().click();
  await page.waitForURL(/\/ui\/sagas\/[0-9a-f-]{36}$/);
  const failure = page.getByRole("note", { name: "Failure" });
  await failure.waitFor();
  assert.match(await failure.textContent(), /PAYMENT_DECLINED at charge_payment/);
  const undone = page.getByRole("list", { name: "Compensations in the order they ran" }).getByRole("listitem");
  const order = (await undone.allTextContents()).map((t) => t.split(" ")[0]);
  assert.deepEqual(order, ["release_inventory", "reject_order"]);
  await page.screenshot({ path: join(SHOTS, "saga.png"), fullPage: true });

  // A deep link to a step lands on it.
  const id = page.url().split("/").pop();
  await page.goto(`${BASE}/ui/sagas/${id}#step-charge_payment`);
  await page.getByRole("table", { name: "Attempts of charge_payment" }).getByText("PAYMENT_DECLINED").waitFor();
  // Each step's own link is that deep link, to copy.
  await page.getByRole("link", { name: "Link to step verify_order" }).click();
  assert.equal(page.url(), `${BASE}/ui/sagas/${id}#step-verify_order`);
  assert.deepEqual(page.errors, []);
});

test("bulk retry shows exactly what it would touch first, and cancelling touches nothing", withTokens, async () => {
  const page = await tab(ADMIN);
  const acts = [];
  page.on("request", (r) => r.url().includes("/bulk-retry") && acts.push(JSON.parse(r.postData() ?? "{}")));
  // With a relative window: the dry run and the retry must use one filter, fixed when the dialog opens.
  await page.goto(`${BASE}/ui/sagas?status=NEEDS_ATTENTION&window=24h`);
  await page.getByRole("button", { name: "Retry matching…" }).click();
  const dialog = page.getByRole("dialog", { name: "Retry the matching sagas" });
  await dialog.getByText("1 match: 1 would be retried, 0 refused.").waitFor();
  assert.match(await dialog.getByRole("listitem").first().textContent(), new RegExp(PARKED.slice(0, 8)));
  assert.ok(await dialog.getByRole("button", { name: "Retry 1 sagas" }).isDisabled(), "no reason yet");
  await page.waitForTimeout(1000); // time for any further dry run the dialog would send (none may come)
  await dialog.getByRole("button", { name: "Cancel" }).click();
  assert.equal(acts.length, 1, `one dry run: ${JSON.stringify(acts)}`);
  const [{ filter, ...rest }] = acts;
  assert.deepEqual(rest, { limit: 500, dry_run: true });
  assert.deepEqual(filter.status, ["NEEDS_ATTENTION"]);
  assert.ok(Date.now() - Date.parse(filter.created_after) < 25 * 3600e3, JSON.stringify(filter));
  assert.deepEqual(page.errors, []);
});

test("an admin replays a dead letter after its dry run", withTokens, async () => {
  const page = await tab(ADMIN);
  await page.getByRole("link", { name: "Dead letters" }).click();
  const row = page.getByRole("row").filter({ hasText: "invalid_json" });
  await row.waitFor();
  assert.match(await row.textContent(), /saga-replies/);
  await row.getByRole("checkbox").check();
  await page.getByRole("button", { name: "Replay 1 selected…" }).click();
  const dialog = page.getByRole("dialog", { name: "Replay dead letters" });
  await dialog.getByText(/would go to .*saga-replies/).waitFor();
  await dialog.getByLabel(/Reason/).fill("replayed from the UI test");
  await dialog.getByRole("button", { name: "Replay 1" }).click();
  await dialog.getByRole("status").filter({ hasText: "Replayed 1, skipped 0." }).waitFor();
  await dialog.getByRole("button", { name: "Close" }).click();
  await page.getByRole("row").filter({ hasText: "invalid_json" }).filter({ hasText: "1×, last by admin" }).first().waitFor();
  assert.deepEqual(page.errors, []);
});

test("an admin retries a NEEDS_ATTENTION saga from its page, a double click acts once, and it finishes", withTokens, async () => {
  const page = await tab(ADMIN);
  await page.goto(`${BASE}/ui/sagas/${PARKED}`);
  const why = page.getByRole("status").filter({ hasText: "Stopped for a human" });
  await why.waitFor();
  assert.match(await why.textContent(), /charge_payment/);
  await page.getByRole("button", { name: "Retry…" }).click();
  const dialog = page.getByRole("dialog", { name: "Retry this saga" });
  await dialog.getByLabel(/Reason/).fill("the gateway is back (UI test)");
  const posts = [];
  page.on("request", (r) => r.method() === "POST" && r.url().includes("/retry") && posts.push(r.headers()["idempotency-key"]));
  // Two clicks in one task, before the page can redraw and disable the button: the harshest
  // double click (a real one lands after the redraw, on a disabled button).
  await dialog.getByRole("button", { name: "Retry", exact: true }).evaluate((button) => {
    button.click();
    button.click();
  });
  await dialog.getByRole("status").filter({ hasText: "NEEDS_ATTENTION → COMPENSATING" }).waitFor();
  await dialog.getByRole("button", { name: "Close" }).click();
  assert.equal(posts.length, 1, `one retry sent, with one Idempotency-Key: ${posts}`);
  assert.match(posts[0], /^ui-retry-[0-9a-f]{32}$/);
  // The page follows the saga while it moves: the compensations finish and it ends FAILED.
  await page.locator("h1 .badge", { hasText: "FAILED" }).waitFor({ timeout: 60_000 });
  const audit = page.getByRole("table", { name: "Audit log" }).getByRole("row");
  await audit.nth(1).waitFor();
  assert.equal(await audit.count(), 2, "a header and one retry: the double click acted once");
  assert.match(await audit.nth(1).textContent(), /RETRY.*the gateway is back/);
  assert.equal(await page.getByRole("status").filter({ hasText: "Stopped for a human" }).count(), 0);
  assert.deepEqual(page.errors, []);
});

test("a read token sees no action, and forcing one is refused with a clear message", withTokens, async () => {
  const page = await tab(READER);
  await page.goto(`${BASE}/ui/sagas?status=FAILED`);
  await page.getByRole("table").getByRole("row").nth(1).waitFor();
  assert.equal(await page.getByRole("button", { name: /Retry|Abort|Replay/ }).count(), 0);
  await page.getByRole("table").getByRole("row").nth(1).getByRole("link").first().click();
  await page.getByRole("heading", { name: "Steps" }).waitFor();
  assert.equal(await page.getByRole("button", { name: /Retry|Abort/ }).count(), 0);
  // Forcing it: the same call the buttons make, with this tab's token.
  const refusal = await page.evaluate(async (id) => {
    const token = sessionStorage.getItem("saga-orchestrator.token");
    const response = await fetch(`/api/v1/sagas/${id}/retry`, {
      method: "POST",
      headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json", "Idempotency-Key": "forced-1" },
      body: JSON.stringify({ reason: "forced" }),
    });
    return { status: response.status, body: await response.json() };
  }, PARKED);
  assert.equal(refusal.status, 403);
  assert.match(refusal.body.detail, /scope read.*needs scope admin/);
  await page.getByRole("link", { name: "Dead letters" }).click();
  await page.getByRole("heading", { name: "Dead letters" }).waitFor();
  assert.equal(await page.getByRole("button", { name: /Replay/ }).count(), 0);
  assert.deepEqual(page.errors, []);
});

test("a wrong token lands on sign-in with a message, and the deep link is kept", withTokens, async () => {
  const page = await tab(null);
  await page.goto(`${BASE}/ui/sagas/${PARKED}`);
  await page.getByLabel("API token").fill("not-a-token-of-this-orchestrator");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("alert").filter({ hasText: "not valid" }).waitFor();
  assert.ok(page.url().endsWith(`/ui/sagas/${PARKED}`));
  await signIn(page, READER);
  await page.getByRole("heading", { name: "Steps" }).waitFor();
  // A token that stops working mid-session (rotated) sends the tab back to sign-in.
  await page.evaluate(() => sessionStorage.setItem("saga-orchestrator.token", "rotated-away-0123456789"));
  await page.getByRole("link", { name: "Overview" }).click();
  await page.getByLabel("API token").waitFor();
  assert.equal(await page.evaluate(() => sessionStorage.getItem("saga-orchestrator.token")), null);
});

test("every page passes axe-core's WCAG 2.1 AA checks, in light and in dark", withTokens, async () => {
  for (const colorScheme of ["light", "dark"]) {
    // bypassCSP: axe is injected inline, which the page's policy (rightly) forbids.
    const page = await tab(ADMIN, { colorScheme, bypassCSP: true });
    const pages = ["/ui/", "/ui/sagas?status=FAILED", `/ui/sagas/${PARKED}`, "/ui/dead-letters"];
    for (const path of pages) {
      await page.goto(`${BASE}${path}`);
      await page.getByRole("heading", { level: 1 }).first().waitFor();
      await page.waitForLoadState("networkidle");
      assert.deepEqual(await accessibility(page), [], `${path} in ${colorScheme}`);
    }
  }
  const signIn = await tab(null, { bypassCSP: true });
  await signIn.goto(`${BASE}/ui/`);
  await signIn.getByLabel("API token").waitFor();
  assert.deepEqual(await accessibility(signIn), [], "sign-in");
});

test("on a phone, in dark mode, the saga page is usable and nothing overflows the screen", withTokens, async () => {
  const page = await tab(ADMIN, { viewport: { width: 390, height: 844 }, colorScheme: "dark", isMobile: true });
  await page.goto(`${BASE}/ui/sagas/${PARKED}`);
  await page.getByRole("heading", { name: "Steps" }).waitFor();
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `the page is ${overflow}px wider than the screen`);
  const background = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
  assert.equal(background, "rgb(21, 23, 26)");
  await page.screenshot({ path: join(SHOTS, "saga-phone-dark.png") });
  // Keyboard: the first Tab reaches the skip link.
  await page.keyboard.press("Tab");
  assert.equal(await page.evaluate(() => document.activeElement?.textContent), "Skip to content");
});

test("with auth off, the page opens without sign-in and a banner says so", { skip: !AUTH_OFF }, async () => {
  const page = await tab(null);
  await page.goto(`${BASE}/ui/`);
  const banner = page.getByRole("status").filter({ hasText: "Authentication is off (AUTH_DISABLED)" });
  await banner.waitFor();
  await page.getByRole("heading", { name: "Overview" }).waitFor();
  assert.equal(await page.getByLabel("API token").count(), 0);
  assert.match(await page.getByRole("banner").textContent(), /no sign-in/);
  assert.deepEqual(page.errors, []);
});

test("with auth off, a running saga is aborted from its page and starts compensating", { skip: !AUTH_OFF }, async () => {
  const running = env("RUNNING_SAGA");
  const page = await tab(null);
  await page.goto(`${BASE}/ui/sagas/${running}`);
  const why = page.getByRole("status").filter({ hasText: "Waiting for the reply to reserve_inventory (attempt 1)" });
  await why.waitFor();
  assert.match(await why.textContent(), /it times out in/);
  await page.getByRole("button", { name: "Abort…" }).click();
  const dialog = page.getByRole("dialog", { name: "Abort this saga" });
  await dialog.getByLabel(/Reason/).fill("customer cancelled (UI test)");
  await dialog.getByRole("button", { name: "Abort", exact: true }).click();
  await dialog.getByRole("status").filter({ hasText: "RUNNING → COMPENSATING" }).waitFor();
  await dialog.getByRole("button", { name: "Close" }).click();
  await page.locator("h1 .badge", { hasText: "COMPENSATING" }).waitFor();
  await page.getByRole("status").filter({ hasText: "the compensation of reserve_inventory" }).waitFor();
  assert.equal(await page.getByRole("button", { name: "Abort…" }).count(), 0, "no abort while compensating");
  await page.getByRole("table", { name: "Audit log" }).getByText("customer cancelled (UI test)").waitFor();
  assert.deepEqual(page.errors, []);
});
