// A page on another site (the attacker's, on a second local origin) whose form posts to the proxied
// app as soon as it loads, as a CSRF attack does. Prints, as JSON, the status and text the browser got
// back and the Sec-Fetch-Site it sent. Run by tests/django.rs.
// Usage: node cross_site_form.cjs ATTACKER_PAGE_URL TARGET_URL
"use strict";

const { launch, run } = require("./launch.cjs");

const [attacker, target] = process.argv.slice(2);

async function main() {
  const browser = await launch();
  try {
    const context = await browser.newContext({ ignoreHTTPSErrors: true });
    const page = await context.newPage();
    page.setDefaultTimeout(15000);
    const answered = page.waitForResponse((r) => r.url().startsWith(target) && r.request().method() === "POST");
    await page.goto(attacker);
    const response = await answered;
    const sent = await response.request().allHeaders();
    return {
      status: response.status(),
      body: await response.text(),
      secFetchSite: sent["sec-fetch-site"] || null,
      origin: sent["origin"] || null,
    };
  } finally {
    await browser.close();
  }
}

run(main);
