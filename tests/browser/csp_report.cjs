// A page whose inline script the proxy's default Content-Security-Policy blocks: the browser fires
// `securitypolicyviolation` and sends its report (Reporting API, `report-to`) to the proxy's collector.
// Waits until the proxy's metrics count it, then prints JSON. Run by tests/django.rs.
// Usage: node csp_report.cjs PAGE_URL METRICS_URL
"use strict";

const { chromium } = require("playwright-core");

const [pageUrl, metricsUrl] = process.argv.slice(2);
const counted = 'portcullis_csp_reports_total{directive="script-src-elem"}';

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.PORTCULLIS_TEST_CHROMIUM || "/usr/bin/chromium",
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      // Reports are batched for a minute; tests (like Chromium's own) send them at once. Report
      // uploads do not use the page's certificate exception, so the local CA is accepted outright.
      "--short-reporting-delay", "--ignore-certificate-errors",
    ],
  });
  try {
    const context = await browser.newContext({ ignoreHTTPSErrors: true });
    await context.addInitScript(() => {
      window.__violations = [];
      document.addEventListener("securitypolicyviolation", (e) => {
        window.__violations.push({ directive: e.effectiveDirective, blocked: e.blockedURI });
      });
    });
    const page = await context.newPage();
    page.setDefaultTimeout(15000);
    await page.goto(pageUrl, { waitUntil: "load" });
    const title = await page.title();
    const violations = await page.evaluate(() => window.__violations);
    // Bounded: 30 s for the report to reach the collector.
    let metric = null;
    for (let i = 0; i < 60 && metric === null; i++) {
      const text = await (await fetch(metricsUrl)).text();
      metric = text.split("\n").find((l) => l.startsWith(counted)) || null;
      if (metric === null) await new Promise((r) => setTimeout(r, 500));
    }
    return { title, violations, metric };
  } finally {
    await browser.close();
  }
}

main()
  .then((report) => console.log(JSON.stringify(report)))
  .catch((error) => {
    console.log(JSON.stringify({ error: String((error && error.stack) || error) }));
    process.exitCode = 1;
  });
