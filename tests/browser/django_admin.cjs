// A real browser (Debian's Chromium, driven by playwright-core) through portcullis to Django's admin: log in,
// open the pages with the most JavaScript and widgets, and report every Content-Security-Policy violation,
// console error and failed subresource. Run by tests/django.rs, which starts Django and the proxy and
// asserts on the JSON this prints. Usage: node django_admin.cjs https://localhost:PORT PASSWORD
"use strict";

const { launch, run } = require("./launch.cjs");

const [base, password] = process.argv.slice(2);
const report = { pages: [], violations: [], consoleErrors: [], failed: [], styled: [] };

async function main() {
  const browser = await launch();
  try {
    // The local CA is not in Chromium's store; TLS itself is verified by the rustls and curl tests.
    const context = await browser.newContext({ ignoreHTTPSErrors: true });
    await context.addInitScript(() => {
      document.addEventListener("securitypolicyviolation", (e) => {
        console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI || "inline"}`);
      });
    });
    const page = await context.newPage();
    page.setDefaultTimeout(15000);
    page.on("console", (msg) => {
      if (msg.type() === "error") {
        const text = msg.text();
        const where = msg.location().url || "";
        // Django has no favicon; the browser asks anyway.
        if (where.endsWith("/favicon.ico")) return;
        (text.startsWith("CSP violation") ? report.violations : report.consoleErrors).push(`${text} (${where})`);
      }
    });
    page.on("response", (response) => {
      const url = new URL(response.url());
      if (response.status() >= 400 && url.pathname !== "/favicon.ico") {
        report.failed.push(`${response.status()} ${url.pathname}`);
      }
    });

    const visit = async (path) => {
      const response = await page.goto(base + path, { waitUntil: "load" });
      // A stylesheet that loaded paints the admin header in its colour, not the browser default.
      const headerColour = await page
        .locator("#header")
        .evaluate((el) => getComputedStyle(el).backgroundColor)
        .catch(() => "none");
      report.styled.push({ path, headerColour });
      report.pages.push({ path, status: response.status(), title: await page.title() });
    };

    await visit("/admin/login/?next=/admin/");
    await page.fill("#id_username", "admin");
    await page.fill("#id_password", password);
    await Promise.all([page.waitForURL(`${base}/admin/`), page.click("input[type=submit]")]);
    report.pages.push({ path: "after login", status: 200, title: await page.title() });
    for (const path of ["/admin/", "/admin/auth/user/", "/admin/auth/user/add/", "/admin/auth/group/add/"]) {
      await visit(path);
    }
  } finally {
    await browser.close();
  }
}

run(async () => {
  await main();
  return report;
}, () => report);
