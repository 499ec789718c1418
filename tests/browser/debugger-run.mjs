// `/debugger` on the running service (`run`, with a token) in a real browser (issue 19, item 3 and
// Apply): the page shows the running pair and its version beside the files on disk; a refused
// reload is named on the page while the editors keep the running pair; Apply writes the watched
// files and shows the reload's result.
//   IOMT_TOKEN=... IOMT_DEVICE_FILE=... IOMT_FHIR_FILE=... node debugger-run.mjs BASE_URL
// BASE_URL is the service's http address (http://127.0.0.1:PORT/). Prints "ok: ..." per check.
import { readFileSync } from "node:fs";
import { launch, sample, check, statusIs, edit, replace, accessible } from "./lib.mjs";

const [base] = process.argv.slice(2);
const { IOMT_TOKEN: token, IOMT_DEVICE_FILE: deviceFile, IOMT_FHIR_FILE: fhirFile } = process.env;
const ready = async () => (await fetch(`${base}health/ready`)).json();

const browser = await launch();
try {
  const context = await browser.newContext({ viewport: { width: 1500, height: 1000 } });
  const page = await context.newPage();
  page.setDefaultTimeout(20000);
  await page.goto(`${base}debugger/`);
  await page.locator("#token").fill(token);
  await page.locator("button[type=submit]").click();
  await statusIs(page, "ok");
  const running = (await ready()).mappingsVersion;
  await page.waitForFunction((v) => document.getElementById("running-version")?.textContent === v, running);
  check((await page.locator("#apply").textContent()) === "Apply to the service", "no Apply to the service");
  console.log(`ok: the page shows the running version ${running}`);

  // Item 3: a broken file on disk is refused by the service; the page names the refusal and keeps
  // showing the running pair, and the files on disk are one click away.
  const good = readFileSync(deviceFile, "utf8");
  const broken = good.replace('"typeMatchExpression": "$..[?(@heartRate)]"', '"typeMatchExpression": "$..[?(@heartRate"');
  replace(deviceFile, broken);
  await page.locator("#refusal").waitFor();
  const refusal = await page.locator("#refusal").textContent();
  check(refusal.includes(`version ${running} keeps running`) && refusal.includes("typeMatchExpression"), `item 3: ${refusal}`);
  const disk = await page.locator("#disk-version").textContent();
  check(disk !== running, "item 3: the disk version is the running one");
  console.log(`ok: item 3: "${refusal.slice(0, 160)}…"; files on disk: version ${disk}`);
  await page.reload();
  await statusIs(page, "ok");
  check((await page.locator("#device-text").inputValue()) === good, "item 3: the page opened the broken file, not the running pair");
  await page.locator("#device-status .ok").waitFor();
  await page.locator("#open-disk").click();
  await page.waitForFunction(() => document.getElementById("device-text").value.includes('@heartRate"'));
  await page.locator("#device-status li.problem").first().waitFor();
  console.log("ok: item 3: opened with the running pair; \"Open files on disk\" shows the refused file and its problem");
  await accessible(page, "under run with a refusal");

  // Apply: the running pair with a new heart-rate code, written and reloaded.
  await page.locator("#samples").click();
  await page.waitForFunction((g) => document.getElementById("device-text").value === g, good);
  const changed = sample("fhirmapping.json").replace("8867-4", "8867-4-applied");
  await edit(page, "#fhir-text", changed);
  await page.locator("#apply").click();
  await page.waitForFunction(() => document.getElementById("apply-result").dataset.result === "applied");
  const result = await page.locator("#apply-result").textContent();
  const now = await ready();
  check(result.includes(`now runs version ${now.mappingsVersion}`) && now.mappingsVersion !== running, `Apply: ${result} / ${JSON.stringify(now)}`);
  check(!now.mappingsRefused, `Apply: the refusal stays: ${now.mappingsRefused}`);
  check(readFileSync(fhirFile, "utf8") === changed && readFileSync(deviceFile, "utf8") === good, "Apply: the files are not what was applied");
  await page.waitForFunction((v) => document.getElementById("running-version")?.textContent === v, now.mappingsVersion);
  await page.waitForFunction(() => !document.getElementById("refusal"));
  console.log(`ok: Apply: "${result}"; /health/ready runs ${now.mappingsVersion}, the refusal is gone`);
  await context.close();
  console.log("debugger on run: ok");
} finally {
  await browser.close();
}
