// Reads a dead job in RabbitMQ's management UI, as an operator would: in headless Chromium
// (Debian's `chromium` package; playwright-core drives it, it never downloads a browser of its
// own), log in, open the queue's page, use "Get messages" (Nack message requeue true: the
// message stays in the queue), and print what the page shows as JSON on stdout:
//   {"messages": [{"exchange", "routing_key", "redelivered", "properties": {..., "headers":
//   {...}}, "payload", "payload_encoding"}], "screenshots": [paths]}
//
// Run by tests/tests/management_ui.rs. Settings from the environment (the password never on
// a command line):
//   WARREN_UI_URL        the management UI, e.g. http://127.0.0.1:15672/
//   WARREN_UI_USER       user name; WARREN_UI_PASSWORD its password
//   WARREN_UI_VHOST      the queue's vhost (e.g. "/")
//   WARREN_UI_QUEUE      the queue to read (a `<queue>.dead`)
//   WARREN_UI_SCREENSHOTS directory for the screenshots (created if missing)
//   WARREN_CHROMIUM      the browser (default /usr/bin/chromium)
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

function setting(name, fallback) {
  const value = process.env[name] ?? fallback;
  if (value === undefined || value === '') {
    throw new Error(`${name} is not set`);
  }
  return value;
}

const base = setting('WARREN_UI_URL').replace(/\/?$/, '/');
const user = setting('WARREN_UI_USER');
const password = setting('WARREN_UI_PASSWORD');
const vhost = setting('WARREN_UI_VHOST', '/');
const queue = setting('WARREN_UI_QUEUE');
const shots = setting('WARREN_UI_SCREENSHOTS');
const executablePath = setting('WARREN_CHROMIUM', '/usr/bin/chromium');
const safeName = queue.replace(/[^A-Za-z0-9._-]/g, '_');

mkdirSync(shots, { recursive: true });
const profile = mkdtempSync(join(tmpdir(), 'warren-chromium-'));
const screenshots = [];
let context;
try {
  // Flags that work on these machines (closed network: no background connections).
  context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
    // Tall enough for the whole queue page: a full-page screenshot would repeat the UI's
    // fixed header in the middle.
    viewport: { width: 1280, height: 2000 },
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(30_000);

  // Log in.
  await page.goto(base);
  await page.locator('#login input[name=username]').fill(user);
  await page.locator('#login input[name=password]').fill(password);
  await page.locator('#login input[type=submit]').click();
  await page.locator('#logout').waitFor();

  // The queue's page.
  await page.goto(`${base}#/queues/${encodeURIComponent(vhost)}/${encodeURIComponent(queue)}`);
  const heading = page.locator('h2', { hasText: 'Get messages' });
  await heading.waitFor();
  // The section starts collapsed: open it.
  const form = page.locator('form[action="#/queues/get"]');
  if (!(await form.isVisible())) {
    await heading.click();
  }
  await form.waitFor({ state: 'visible' });
  await form.locator('select[name=ackmode]').selectOption('ack_requeue_true');
  await form.locator('input[name=count]').fill('10');
  await form.locator('input[type=submit]').click();

  // Fetched messages slide in: wait for them, then for the animation to settle.
  const boxes = page.locator('#msg-wrapper .box');
  await boxes.first().waitFor({ state: 'visible' });
  await page.waitForFunction(() => {
    const wrapper = document.querySelector('#msg-wrapper');
    return wrapper && wrapper.getAnimations({ subtree: true }).length === 0;
  });
  await page.waitForTimeout(500);
  const shot = join(shots, `management-ui-${safeName}.png`);
  await page.screenshot({ path: shot });
  screenshots.push(shot);

  const messages = await page.evaluate(() => {
    // A `table.mini` as an object; nested tables (headers) as nested objects.
    const readMini = (table) => {
      const out = {};
      for (const row of table.querySelectorAll(':scope > tbody > tr, :scope > tr')) {
        const th = row.querySelector(':scope > th');
        const td = row.querySelector(':scope > td');
        if (!th || !td) continue;
        const key = th.textContent.trim().replace(/:$/, '');
        const inner = td.querySelector(':scope > table.mini');
        out[key] = inner ? readMini(inner) : td.textContent.trim();
      }
      return out;
    };
    return [...document.querySelectorAll('#msg-wrapper .box')].map((box) => {
      const facts = {};
      for (const row of box.querySelectorAll(':scope > table.facts > tbody > tr, :scope > table.facts > tr')) {
        const th = row.querySelector(':scope > th');
        const td = row.querySelector(':scope > td');
        if (th && td) facts[th.childNodes[0].textContent.trim()] = td;
      }
      const properties = facts.Properties?.querySelector('table.mini');
      const encoding = [...box.querySelectorAll('sub')]
        .map((s) => s.textContent.trim())
        .find((t) => t.startsWith('Encoding:'));
      return {
        exchange: facts.Exchange?.textContent.trim() ?? null,
        routing_key: facts['Routing Key']?.textContent.trim() ?? null,
        redelivered: facts.Redelivered?.textContent.trim() ?? null,
        properties: properties ? readMini(properties) : {},
        payload: box.querySelector('pre.msg-payload')?.textContent ?? null,
        payload_encoding: encoding ? encoding.replace('Encoding:', '').trim() : null,
      };
    });
  });
  process.stdout.write(`${JSON.stringify({ messages, screenshots })}\n`);
} catch (err) {
  if (context) {
    const page = context.pages()[0];
    if (page) {
      const shot = join(shots, `management-ui-${safeName}-failed.png`);
      await page.screenshot({ path: shot }).catch(() => {});
      process.stderr.write(`screenshot of the failure: ${shot}\n`);
    }
  }
  process.stderr.write(`management UI test failed: ${err.stack ?? err}\n`);
  process.exitCode = 1;
} finally {
  await context?.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
