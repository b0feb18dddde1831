// A page whose inline script the proxy's default Content-Security-Policy blocks: the browser fires
// `securitypolicyviolation` and sends its report (Reporting API, `report-to`) to the proxy's collector.
// Waits until the proxy's metrics count it, then prints JSON. Run by tests/django.rs.
// Usage: node csp_report.cjs PAGE_URL METRICS_URL
"use strict";

const { launch, run } = require("./launch.cjs");

const [pageUrl, metricsUrl] = process.argv.slice(2);
const counted = 'portcullis_csp_reports_total{directive="script-src-elem"}';

async function main() {
  const browser = await launch([
    // Reports are batched for a minute; tests (like Chromium's own) send them at once. Report
    // uploads do not use the page's certificate exception, so the local CA is accepted outright.
    "--short-reporting-delay", "--ignore-certificate-errors",
  ]);
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

run(main);
