// The mapping debugger in a real browser: open the page, break a mapping and see the error at the
// right line, fix it, paste a message and see the expected Observation.
//   node debugger.mjs URL [SCREENSHOT.png]
// Exits 0 when every step holds; prints what failed otherwise. Chromium: /usr/bin/chromium
// (Debian's package, installed by scripts/setup.sh), or $CHROMIUM.
import { chromium } from "playwright-core";
import { readFileSync } from "node:fs";

const [url, screenshot] = process.argv.slice(2);
const sample = (p) => readFileSync(new URL(`../../mappings/${p}`, import.meta.url), "utf8");
const fail = (what) => { console.error(`FAIL: ${what}`); process.exit(1); };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1500, height: 1000 } });
  page.setDefaultTimeout(15000);
  await page.goto(url);
  const device = page.locator("#device-editor textarea");
  // The page opens with the sample mappings, both valid.
  await page.locator("#device-status .ok").waitFor();
  await page.locator("#fhir-status .ok").waitFor();
  const good = await device.inputValue();
  if (!good.includes("heartrate")) fail("the sample device mapping did not load");

  // Break line 6: a typeMatchExpression that is not JSONPath.
  const lines = good.split("\n");
  const at = lines.findIndex((l) => l.includes("typeMatchExpression"));
  if (at < 0) fail("no typeMatchExpression in the sample");
  lines[at] = lines[at].replace(/"typeMatchExpression": ".*"/, '"typeMatchExpression": "$..[?(@heartRate"');
  await device.fill(lines.join("\n"));
  const problem = page.locator("#device-status li.problem").first();
  await problem.waitFor();
  const text = await problem.textContent();
  if (!text.includes(`line ${at + 1},`)) fail(`the error is not at line ${at + 1}: ${text}`);
  const marked = await page.locator(`#device-editor .gutter div.error`).first().getAttribute("data-line");
  if (marked !== String(at + 1)) fail(`the gutter marks line ${marked}, not ${at + 1}`);
  console.log(`broken mapping: "${text.trim()}" marked at line ${marked}`);

  // Fix it; paste a heart-rate message.
  await device.fill(good);
  await page.locator("#device-status .ok").waitFor();
  await page.locator("#messages").fill(sample("messages/heartrate.json"));
  await page.waitForFunction(() => document.getElementById("observations").textContent.includes("8867-4"));
  const observations = JSON.parse(await page.locator("#observations").textContent());
  const hr = observations.find((o) => o.code?.coding?.some((c) => c.code === "8867-4"));
  if (!hr || !hr.valueSampledData?.data) fail(`no heart-rate Observation with SampledData: ${JSON.stringify(observations)}`);
  const why = await page.locator("#templates").textContent();
  if (!/CalculatedContent 'heartrate'[0-9]+ match/.test(why) || !why.includes("typeMatchExpression found nothing")) fail(`no explanation: ${why}`);
  const readings = hr.valueSampledData.data.split(" ").filter((v) => v !== "E");
  console.log(`message → Observation ${hr.code.coding[0].code} with ${readings.length} readings in its SampledData (${readings.join(" ")})`);
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
  console.log("debugger page: ok");
} finally {
  await browser.close();
}
