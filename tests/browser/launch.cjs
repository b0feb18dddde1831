// What the browser scripts share: Debian's Chromium (driven by playwright-core, which downloads no
// browser) with flags for a closed, loopback-only machine, and the one JSON line each prints for
// tests/django.rs to read.
"use strict";

const { chromium } = require("playwright-core");

// No background fetches to Google; no sandbox (root in CI).
const FLAGS = [
  "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

exports.launch = (extraFlags = []) =>
  chromium.launch({
    executablePath: process.env.PORTCULLIS_TEST_CHROMIUM || "/usr/bin/chromium",
    args: [...FLAGS, ...extraFlags],
  });

// Runs `main`, printing its result as JSON; on failure prints `partial` with the error and exits 1.
exports.run = (main, partial = () => ({})) =>
  main()
    .then((report) => console.log(JSON.stringify(report)))
    .catch((error) => {
      console.log(JSON.stringify({ ...partial(), error: String((error && error.stack) || error) }));
      process.exitCode = 1;
    });
