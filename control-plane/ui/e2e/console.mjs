#!/usr/bin/env node
// End-to-end check of the web console in a real headless Chromium (Debian's `chromium`; no
// browser is downloaded), driven by a Rust test that starts the control plane, a real agent
// and containers, and talks to this script over stdin/stdout lines.
//
// Environment:
//   EDGEPLANE_URL          https://127.0.0.1:PORT (the control plane's API port)
//   EDGEPLANE_API_KEY      the admin key to sign in with
//   STANDARD_ENV_NAME      name of the standard environment this script creates from the UI
//   CONTAINER_NAME         a running container (`sleep`) on that environment's engine
//   ASYNC_ENV_ID           an async environment, already up, whose snapshot lists...
//   ASYNC_CONTAINER_NAME   ...this running container
//   E2E_ARTIFACTS          directory for failure screenshots and page dumps (default: a temp dir)
//   SCREENSHOTS            optional directory: PNGs of the main screens at 1280x800
//   CHROMIUM               the browser (default /usr/bin/chromium)
//   E2E_SLOW               optional factor for every timeout (slow machines)
//
// Protocol (stdout, one line each; diagnostics go to stderr):
//   STEP <name> ok                after each step
//   EDGE_KEY <key>                the join key of the environment created; then the script waits
//                                 (60 s) for the line AGENT_STARTED on stdin
//   STEP <name> FAILED <message>  and the process exits with status 1
//   DONE                          all steps passed (exit status 0)

import { chromium } from 'playwright-core';
import { mkdir, mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import readline from 'node:readline';

function need(name) {
  const v = process.env[name];
  if (!v) {
    console.error(`console.mjs: the environment variable ${name} is required`);
    process.stdout.write(`STEP setup FAILED ${name} is not set\n`);
    process.exit(2);
  }
  return v;
}

const BASE = need('EDGEPLANE_URL').replace(/\/+$/, '');
const API_KEY = need('EDGEPLANE_API_KEY');
const ENV_NAME = need('STANDARD_ENV_NAME');
const CONTAINER = need('CONTAINER_NAME');
const ASYNC_ENV_ID = need('ASYNC_ENV_ID');
const ASYNC_CONTAINER = need('ASYNC_CONTAINER_NAME');
const SLOW = Math.max(1, Number(process.env.E2E_SLOW) || 1);
const ARTIFACTS = process.env.E2E_ARTIFACTS || (await mkdtemp(join(tmpdir(), 'edgeplane-e2e-')));
const SHOTS = process.env.SCREENSHOTS || '';
const ms = (n) => Math.round(n * SLOW);

await mkdir(ARTIFACTS, { recursive: true });
if (SHOTS) await mkdir(SHOTS, { recursive: true });

const out = (line) => process.stdout.write(`${line}\n`);
const log = (...a) => console.error('[e2e]', ...a);

// stdin: lines from the harness.
const lines = [];
const waiters = [];
let stdinClosed = false;
const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (l) => {
  lines.push(l.trim());
  for (const w of waiters.splice(0)) w();
});
rl.on('close', () => {
  stdinClosed = true;
  for (const w of waiters.splice(0)) w();
});

async function waitForLine(want, timeout) {
  const deadline = Date.now() + timeout;
  for (;;) {
    if (lines.includes(want)) return;
    if (stdinClosed) throw new Error(`stdin closed before the line ${want}`);
    const left = deadline - Date.now();
    if (left <= 0) throw new Error(`no line ${want} on stdin within ${timeout / 1000} s`);
    await new Promise((resolve) => {
      const t = setTimeout(resolve, left);
      waiters.push(() => {
        clearTimeout(t);
        resolve();
      });
    });
  }
}

/** A CSS attribute selector's value, quoted. */
const q = (s) => JSON.stringify(String(s));

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const context = await browser.newContext({
  ignoreHTTPSErrors: true,
  viewport: { width: 1280, height: 800 },
  deviceScaleFactor: 1,
  locale: 'en-GB',
  timezoneId: 'UTC',
});
// The text of the console's terminal (xterm.js exposes it to tests on window.__edgeplaneTerm).
await context.addInitScript(() => {
  window.terminalText = () => {
    const t = window.__edgeplaneTerm;
    if (!t) return '';
    const b = t.buffer.active;
    const lines = [];
    for (let i = 0; i < b.length; i++) lines.push(b.getLine(i)?.translateToString(true) ?? '');
    return lines.join('\n');
  };
});
const page = await context.newPage();
page.setDefaultTimeout(ms(15000));
page.on('console', (m) => {
  if (m.type() === 'error' || m.type() === 'warning') log(`browser ${m.type()}: ${m.text()}`);
});
page.on('pageerror', (e) => log(`page error: ${e.message}`));
page.on('requestfailed', (r) => {
  const f = r.failure()?.errorText ?? '';
  if (!f.includes('ERR_ABORTED')) log(`request failed: ${r.method()} ${r.url()} ${f}`);
});
page.on('response', (r) => {
  if (r.status() >= 400) log(`answer ${r.status()}: ${r.request().method()} ${r.url()}`);
});

let current = 'setup';

async function shot(name) {
  if (!SHOTS) return;
  // Let polls and fonts settle; no notifications over the page, no blinking caret.
  await page.waitForTimeout(300);
  for (const b of await page.getByRole('button', { name: 'Dismiss message' }).all()) await b.click().catch(() => {});
  await page.screenshot({ path: join(SHOTS, `${name}.png`), caret: 'hide', animations: 'disabled' });
  log(`screenshot ${name}.png`);
}

async function fail(name, err) {
  const message = (err && err.message ? err.message : String(err)).split('\n')[0];
  out(`STEP ${name} FAILED ${message}`);
  console.error(err);
  try {
    await page.screenshot({ path: join(ARTIFACTS, `failed-${name}.png`), fullPage: true });
    await writeFile(join(ARTIFACTS, `failed-${name}.html`), await page.content());
    const term = await page.evaluate(() => (window.terminalText ? window.terminalText() : '')).catch(() => '');
    if (term.trim()) await writeFile(join(ARTIFACTS, `failed-${name}-terminal.txt`), term);
    log(`artifacts: ${join(ARTIFACTS, `failed-${name}.png`)} and .html (page at ${page.url()})`);
  } catch (e) {
    log(`could not save artifacts: ${e.message}`);
  }
  await browser.close().catch(() => {});
  process.exit(1);
}

async function step(name, f) {
  current = name;
  const t0 = Date.now();
  try {
    await f();
  } catch (e) {
    await fail(name, e);
  }
  log(`${name}: ${Date.now() - t0} ms`);
  out(`STEP ${name} ok`);
}

/** Polls `f` until it answers a truthy value. */
async function until(what, timeout, f, every = 250) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    last = await f();
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout / 1000} s waiting for ${what}`);
    await page.waitForTimeout(every);
  }
}

process.on('unhandledRejection', (e) => fail(current, e));

// ---------------------------------------------------------------------------------------

await step('sign-in', async () => {
  await page.goto(`${BASE}/ui/`);
  const key = page.getByTestId('signin-key');
  await key.waitFor({ timeout: ms(20000) });
  await key.fill(API_KEY);
  await page.getByTestId('signin-submit').click();
  await page.getByTestId('nav-environments').waitFor();
  // The key is kept nowhere the page can read it again.
  const leaks = await page.evaluate((k) => {
    const where = [];
    const dump = (s) => Array.from({ length: s.length }, (_, i) => `${s.key(i)}=${s.getItem(s.key(i))}`).join('\n');
    if (dump(localStorage).includes(k)) where.push('localStorage');
    if (dump(sessionStorage).includes(k)) where.push('sessionStorage');
    if (document.cookie.includes(k)) where.push('document.cookie');
    if (document.documentElement.outerHTML.includes(k)) where.push('the DOM');
    for (const el of document.querySelectorAll('input')) if (el.value.includes(k)) where.push('an input');
    return where;
  }, API_KEY);
  if (leaks.length) throw new Error(`the admin key is still readable in ${leaks.join(', ')}`);
  await page.getByTestId('count-total').waitFor({ timeout: ms(20000) });
  await shot('overview');
});

let edgeKey = '';
await step('create-environment', async () => {
  await page.getByTestId('nav-environments').click();
  await page.getByTestId('create-environment').click();
  const form = page.getByTestId('env-form');
  await form.getByTestId('env-name').fill(ENV_NAME);
  await form.getByTestId('mode-standard').check();
  await form.getByTestId('env-form-submit').click();
  const dialog = page.getByTestId('install-dialog');
  const command = dialog.locator('[data-testid="install-command"][data-platform="docker"]');
  await command.waitFor({ timeout: ms(20000) });
  const text = await command.innerText();
  const m = /EDGE_KEY=(?:'([^']+)'|"([^"]+)"|(\S+))/.exec(text);
  if (!m) throw new Error(`no EDGE_KEY in the docker install command:\n${text}`);
  edgeKey = m[1] ?? m[2] ?? m[3];
  out(`EDGE_KEY ${edgeKey}`);
  await dialog.getByTestId('install-done').click();
  await dialog.waitFor({ state: 'detached' });
});

await step('agent-started', async () => {
  await waitForLine('AGENT_STARTED', 60000);
});

await step('environment-up', async () => {
  // The list refreshes by itself: no reload here.
  const search = page.getByTestId('env-search');
  await search.fill(ENV_NAME);
  const row = page.locator(`tr[data-testid="env-row"][data-env-name=${q(ENV_NAME)}]`);
  await row.waitFor({ timeout: ms(20000) });
  await until(`${ENV_NAME} to show up in the list`, ms(60000), async () => (await row.getAttribute('data-status')) === 'up', 500);
  const badge = (await row.getByTestId('env-status').innerText()).trim();
  if (badge !== 'up') throw new Error(`the row says ${badge}`);
  await shot('environments');
});

await step('open-environment', async () => {
  const row = page.locator(`tr[data-testid="env-row"][data-env-name=${q(ENV_NAME)}]`);
  await row.getByTestId('env-link').click();
  await page.locator(`[data-testid="environment-page"][data-env-name=${q(ENV_NAME)}]`).waitFor();
});

const containerRow = () => page.locator(`tr[data-testid="container-row"][data-container-name=${q(CONTAINER)}]`);

await step('list-containers', async () => {
  // The first call opens the tunnel.
  await containerRow().waitFor({ timeout: ms(60000) });
  const state = await containerRow().getAttribute('data-state');
  if (state !== 'running') throw new Error(`${CONTAINER} is ${state}, expected running`);
  await shot('environment');
});

await step('shell', async () => {
  await containerRow().getByTestId('container-shell').click();
  const status = page.getByTestId('shell-status');
  await until('the shell to connect', ms(30000), async () => {
    const s = await status.getAttribute('data-state');
    if (s === 'error' || s === 'closed') throw new Error(`the shell did not connect: ${await status.innerText()}`);
    return s === 'open';
  });
  await page.waitForFunction(() => !!window.__edgeplaneTerm, null, { timeout: ms(10000) });
  await page.getByTestId('terminal').click();
  // Let the shell print its prompt first (typing before it may be echoed out of order); a
  // shell that prints none gets the keys after 10 s all the same.
  await until('a prompt in the terminal', ms(10000), () => page.evaluate(() => terminalText().trim() !== ''), 200).catch(() =>
    log('no prompt in the terminal after 10 s; typing anyway'),
  );
  await page.keyboard.type('echo hello', { delay: 20 });
  await page.keyboard.press('Enter');
  await until('"hello" in the terminal', ms(20000), () =>
    page.evaluate(() => terminalText().split('\n').some((line) => line.trim() === 'hello')),
  );
  await shot('shell');
  await page.getByTestId('shell-close').click();
  await page.getByTestId('shell-panel').waitFor({ state: 'detached' });
});

await step('stop-container', async () => {
  await containerRow().getByTestId('container-stop').click();
  // A `sleep` ignores SIGTERM: the engine kills it after the stop timeout (10 s).
  await until(`${CONTAINER} to be exited`, ms(60000), async () => (await containerRow().getAttribute('data-state')) === 'exited', 500);
  const badge = (await containerRow().getByTestId('container-state').innerText()).trim();
  if (badge !== 'exited') throw new Error(`the row says ${badge}`);
});

await step('async-open', async () => {
  await page.goto(`${BASE}/ui/#/environments/${encodeURIComponent(ASYNC_ENV_ID)}`);
  await page.locator(`[data-testid="environment-page"][data-env-id=${q(ASYNC_ENV_ID)}]`).waitFor({ timeout: ms(20000) });
});

let commandId = '';
await step('async-queue-stop', async () => {
  const row = page.locator(`tr[data-testid="snap-container-row"][data-container-name=${q(ASYNC_CONTAINER)}]`);
  await row.waitFor({ timeout: ms(30000) });
  const before = new Set(await page.locator('tr[data-testid="command-row"]').evaluateAll((rows) => rows.map((r) => r.getAttribute('data-command-id'))));
  await row.getByTestId('queue-stop').click();
  const cmd = page.locator(`tr[data-testid="command-row"][data-type="containerStop"][data-target=${q(ASYNC_CONTAINER)}]`);
  commandId = await until('the queued stop in the history', ms(20000), async () => {
    const ids = await cmd.evaluateAll((rows) => rows.map((r) => r.getAttribute('data-command-id')));
    return ids.find((id) => !before.has(id)) ?? '';
  });
});

await step('async-command-succeeded', async () => {
  const row = page.locator(`tr[data-testid="command-row"][data-command-id=${q(commandId)}]`);
  await until('the stop to succeed', ms(120000), async () => {
    const s = await row.getAttribute('data-state');
    if (s === 'failed') throw new Error(`the command failed: ${(await row.innerText()).replace(/\s+/g, ' ')}`);
    return s === 'succeeded';
  }, 1000);
  await shot('async-environment');
});

await step('edge-stacks', async () => {
  await page.getByTestId('nav-edge-stacks').click();
  await page.getByRole('heading', { level: 1, name: 'Edge stacks' }).waitFor();
  await page.locator('[data-testid="edge-stacks-table"], .empty').first().waitFor({ timeout: ms(20000) });
  await shot('edge-stacks');
});

await step('sign-out', async () => {
  await page.getByTestId('sign-out').click();
  await page.getByTestId('signin-form').waitFor();
  // The browser no longer holds the session: a reload asks to sign in again.
  await page.reload();
  await page.getByTestId('signin-form').waitFor({ timeout: ms(20000) });
});

out('DONE');
await browser.close();
process.exit(0);
