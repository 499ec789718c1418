// Shared by the debugger's browser tests: Debian's Chromium through playwright-core, axe-core.
import { chromium } from "playwright-core";
import AxeBuilder from "@axe-core/playwright";
import { readFileSync, writeFileSync, renameSync } from "node:fs";

export const sample = (p) => readFileSync(new URL(`../../mappings/${p}`, import.meta.url), "utf8");
export const fail = (what) => { console.error(`FAIL: ${what}`); process.exit(1); };
export const check = (cond, what) => { if (!cond) fail(what); };

/** Replaces a file as an editor or a deployment does: write aside, rename over. */
export function replace(path, text) {
  writeFileSync(`${path}.new`, text);
  renameSync(`${path}.new`, path);
}

export async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
}

/** The status bar's state once it is `want` (the page debounces and then asks the server). */
export async function statusIs(page, want) {
  await page.waitForFunction((w) => document.getElementById("status").dataset.state === w, want);
  return page.locator("#status").textContent();
}

/** Types into an editor as a user does (so the page sees input events) and waits for the check. */
export async function edit(page, selector, text) {
  await page.locator(selector).fill(text);
  return statusIs(page, "ok");
}

/** axe-core on the page as it stands: no serious or critical violation. */
export async function accessible(page, when) {
  const result = await new AxeBuilder({ page }).withTags(["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"]).analyze();
  const bad = result.violations.filter((v) => v.impact === "serious" || v.impact === "critical");
  for (const v of result.violations) {
    console.log(`axe (${when}): ${v.impact} ${v.id}: ${v.help} (${v.nodes.length}): ${v.nodes.slice(0, 3).map((n) => n.target.join(" ")).join("; ")}`);
  }
  check(!bad.length, `axe found ${bad.length} serious or critical violations ${when}: ${bad.map((v) => v.id).join(", ")}`);
  console.log(`ok: axe-core ${result.testEngine.version}, ${when}: ${result.passes.length} rules pass, no serious or critical violation`);
}
