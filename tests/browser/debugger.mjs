// The mapping debugger (`iomt-connector studio`) in a real browser, one scenario per finding of
// issue 19 plus the original walk-through:
//   node debugger.mjs URL SCENARIO[,SCENARIO...]
// Scenarios: basics, partial (items 5, 6), runtime, layout (item 7), files, save, a11y (item 8),
// too-large and unreachable (item 1; unreachable stops the studio: IOMT_STUDIO_PID), missing
// (item 4: a studio started without its files). IOMT_DEVICE_FILE / IOMT_FHIR_FILE: the files the
// studio opened (save checks them); IOMT_SCREENSHOTS=DIR: layout writes debugger-1024.png and
// debugger-1500.png there. Prints "ok: ..." per check; exits 1 at the first that fails.
import { readFileSync } from "node:fs";
import { launch, sample, fail, check, statusIs, edit, accessible } from "./lib.mjs";

const [url, which = "basics"] = process.argv.slice(2);
const device = "#device-text", fhir = "#fhir-text";

async function opened(page) {
  await page.goto(url);
  await statusIs(page, "ok");
}

const scenarios = {
  async basics(page) {
    await opened(page);
    await page.locator("#device-status .ok").waitFor();
    await page.locator("#fhir-status .ok").waitFor();
    const good = await page.locator(device).inputValue();
    check(good.includes("heartrate"), "the sample device mapping did not load");
    const lines = good.split("\n");
    const at = lines.findIndex((l) => l.includes("typeMatchExpression"));
    lines[at] = lines[at].replace(/"typeMatchExpression": ".*"/, '"typeMatchExpression": "$..[?(@heartRate"');
    await edit(page, device, lines.join("\n"));
    const text = await page.locator("#device-status li.problem").first().textContent();
    check(text.includes(`line ${at + 1},`), `the error is not at line ${at + 1}: ${text}`);
    const marked = await page.locator("#device-editor .gutter div.error").first().getAttribute("data-line");
    check(marked === String(at + 1), `the gutter marks line ${marked}, not ${at + 1}`);
    console.log(`ok: broken mapping "${text.trim()}" marked at line ${marked}`);
    await edit(page, device, good);
    await edit(page, "#messages", sample("messages/heartrate.json"));
    const hr = await observation(page, "8867-4");
    check(hr.valueSampledData?.data, `no SampledData: ${JSON.stringify(hr)}`);
    const summary = await page.locator("#summaries article.msg h3").first().textContent();
    check(/Message 1: 1 of \d+ templates matched → \d+ measurements/.test(summary), `no one-line summary: ${summary}`);
    console.log(`ok: message → Observation 8867-4, summary "${summary}"`);
  },

  // Item 5 (one broken template hides nothing else) and item 6 (the unknown type at its member).
  async partial(page) {
    await opened(page);
    const good = await page.locator(device).inputValue();
    const broken = good.replace('"templateType": "CalculatedContent"', '"templateType": "CalculatedContnet"');
    await edit(page, device, broken);
    const problem = await page.locator("#device-status li.problem").first().textContent();
    check(problem.includes("line 5, column 23") && problem.includes("template 'heartrate'") && problem.includes("CalculatedContnet"),
      `item 6: not at the templateType member with the template's name: ${problem}`);
    console.log(`ok: item 6: "${problem.trim()}"`);
    await edit(page, "#messages", sample("messages/spo2.json"));
    const spo2 = await observation(page, "59408-5");
    check(spo2, "item 5: no SpO2 Observation beside the broken heart-rate template");
    const partial = await page.locator("#partial").textContent();
    check(partial.includes("templates that load"), `item 5: the results are not said to be partial: ${partial}`);
    console.log(`ok: item 5: the SpO2 Observation is shown beside the broken template; "${partial}"`);
  },

  // An error met while running a message: marked at its line in the device mapping.
  async runtime(page) {
    await opened(page);
    await edit(page, "#messages", JSON.stringify({ deviceId: "d1", heartRate: 70 }));
    const row = await page.locator("#summaries tr.failed td.why").first().textContent();
    check(row.includes("timestampExpression"), `no failing template row: ${row}`);
    const line = await page.locator("#device-editor .gutter div.runtime").first().getAttribute("data-line");
    const text = (await page.locator(device).inputValue()).split("\n")[+line - 1] || "";
    check(text.includes("timestampExpression"), `the runtime error is marked at line ${line}: ${text}`);
    await page.locator("#summaries button.goto").first().click();
    console.log(`ok: the missing timestamp is marked at line ${line} (${text.trim()})`);
  },

  // Item 7: wrapping, 1024 px, resizable editors, a paste keeps the problem in view, grey
  // collapsed non-matches, empty states in words.
  async layout(page) {
    await page.setViewportSize({ width: 1024, height: 900 });
    await opened(page);
    for (const id of ["#measurements", "#observations", "#errors"]) {
      const t = (await page.locator(id).textContent()).trim();
      check(t !== "[]" && t !== "none" && t.length > 3, `item 7: empty state of ${id} is "${t}"`);
    }
    console.log("ok: item 7: empty states in words");
    const resize = await page.locator("#device-editor").evaluate((e) => getComputedStyle(e).resize);
    check(resize === "vertical", `item 7: the editor is not resizable (${resize})`);
    // A paste of a long mapping whose problem is near the top: the caret ends at the bottom.
    const good = await page.locator(device).inputValue();
    const long = good.replace('"typeMatchExpression": "$..[?(@heartRate)]"', '"typeMatchExpression": "$..[?(@heartRate"');
    await page.locator(device).fill("");
    await page.context().grantPermissions(["clipboard-read", "clipboard-write"]);
    await page.evaluate((t) => navigator.clipboard.writeText(t), long);
    await page.locator(device).focus();
    await page.keyboard.press("Control+V");
    await statusIs(page, "ok");
    await page.locator("#device-status li.problem").first().waitFor();
    const visible = await page.locator(device).evaluate((a) => {
      const top = (8 - 1) * 18;
      return top >= a.scrollTop && top + 18 <= a.scrollTop + a.clientHeight && a.selectionStart === a.value.length;
    });
    check(visible, "item 7: after the paste the marked line 8 is out of view");
    console.log("ok: item 7: after a paste the marked line is in view (the caret stays at the end)");
    await edit(page, device, good);
    await edit(page, "#messages", `${sample("messages/heartrate.json")}\n---\n${JSON.stringify({ deviceId: "d1", heartRate: 70 })}`);
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    check(overflow <= 0, `item 7: the page is ${overflow}px wider than 1024`);
    const whyRight = await page.locator("#summaries td.why").evaluateAll((cells) => Math.max(...cells.map((c) => c.getBoundingClientRect().right)));
    check(whyRight <= 1024, `item 7: the why column ends at ${whyRight}px`);
    const collapsed = await page.locator("#summaries details.unmatched").first().evaluate((d) => !d.open);
    const grey = await page.locator("#summaries tr.unmatched td").first().evaluate((td) => getComputedStyle(td).color);
    check(collapsed && grey === "rgb(74, 85, 99)", `item 7: non-matches not grey and collapsed (${collapsed}, ${grey})`);
    const long2 = await page.locator("#observations details").first().evaluate((d) => d.querySelector("pre").textContent.split("\n").length > 40 ? !d.open : d.open);
    check(long2, "item 7: a long Observation is not collapsed");
    console.log(`ok: item 7: at 1024 px nothing overflows (why column ends at ${Math.round(whyRight)}px), non-matches grey and collapsed, long JSON collapsed`);
    const dir = process.env.IOMT_SCREENSHOTS;
    if (dir) {
      // The runtime error's line in view, as a user sees it after clicking "line 10".
      await page.locator("#summaries button.goto").first().click();
      await page.screenshot({ path: `${dir}/debugger-1024.png`, fullPage: true });
      await page.setViewportSize({ width: 1500, height: 1000 });
      await page.waitForTimeout(200);
      await page.screenshot({ path: `${dir}/debugger-1500.png`, fullPage: true });
      console.log(`ok: screenshots in ${dir}`);
    }
    await page.setViewportSize({ width: 1500, height: 1000 });
    const right1500 = await page.locator("#summaries td.why").evaluateAll((cells) => Math.max(...cells.map((c) => c.getBoundingClientRect().right)));
    check(right1500 <= 1500, `item 7: the why column ends at ${right1500}px at 1500`);
  },

  // Open mapping files from the page.
  async files(page) {
    await opened(page);
    const text = sample("fhirmapping.json").replace("8867-4", "8867-4-from-file");
    await page.locator("#open-fhir").setInputFiles({ name: "mine.json", mimeType: "application/json", buffer: Buffer.from(text) });
    await page.waitForFunction(() => document.getElementById("fhir-text").value.includes("8867-4-from-file"));
    await statusIs(page, "ok");
    await page.locator("#fhir-status .ok").waitFor();
    console.log("ok: a FHIR mapping file opened from the page is in the editor and checked");
  },

  // studio's Apply: validated, then written over the files it opened.
  async save(page) {
    await opened(page);
    const bad = (await page.locator(device).inputValue()).replace('"typeMatchExpression": "$..[?(@heartRate)]"', '"typeMatchExpression": "$..[?(@heartRate"');
    await edit(page, device, bad);
    await page.locator("#apply").click();
    await page.waitForFunction(() => document.getElementById("apply-result").dataset.result === "failed");
    check(!readFileSync(process.env.IOMT_DEVICE_FILE, "utf8").includes("@heartRate\""), "an invalid mapping was written");
    await edit(page, device, sample("devicecontent.json"));
    const changed = sample("fhirmapping.json").replace("8867-4", "8867-5");
    await edit(page, fhir, changed);
    await page.locator("#apply").click();
    await page.waitForFunction(() => document.getElementById("apply-result").dataset.result === "none");
    check(readFileSync(process.env.IOMT_FHIR_FILE, "utf8") === changed, "Save to files did not write the FHIR mapping");
    console.log(`ok: save: refused while invalid, then "${await page.locator("#apply-result").textContent()}"`);
  },

  // Item 8: labels, focus, live regions, contrast, and axe-core.
  async a11y(page) {
    await opened(page);
    await edit(page, "#messages", `${sample("messages/heartrate.json")}\n---\n${JSON.stringify({ deviceId: "d1", heartRate: 70 })}`);
    for (const name of ["Device mapping (CollectionContent)", "FHIR mapping (CollectionFhir)", "Sample message", "Add message files", "Open a device mapping file", "Messages (JSON; separate several with a line holding only ---)"]) {
      const control = page.getByLabel(name, { exact: true }).and(page.locator("textarea, select, input"));
      check(await control.count() === 1, `item 8: no control labelled "${name}"`);
    }
    check(await page.locator(".gutter[aria-hidden=true]").count() === 2, "item 8: the gutters are read out");
    check(await page.locator("pre[aria-hidden=true][tabindex='-1']").count() === 2, "item 8: the colour layers are in the tab order");
    check(await page.locator("#status[role=status]").count() === 1, "item 8: no live status");
    await page.locator("#sample-message").focus();
    for (let i = 0; i < 30 && !(await page.evaluate(() => document.activeElement?.id === "device-text")); i++) {
      const id = await page.evaluate(() => document.activeElement?.id || document.activeElement?.tagName);
      check(id !== "PRE", "item 8: Tab reached a hidden layer");
      await page.keyboard.press("Shift+Tab");
    }
    const outline = await page.locator("#device-editor").evaluate((e) => getComputedStyle(e).outlineStyle);
    check(outline === "solid", `item 8: no visible focus on the device editor (${outline})`);
    console.log("ok: item 8: labels, hidden gutters and layers, a live status, visible focus");
    await accessible(page, "with results");
    await page.locator("#summaries details.unmatched").first().evaluate((d) => { d.open = true; });
    await edit(page, device, "{");
    await accessible(page, "with a problem and an open list of non-matches");
  },

  // Item 1: a request past the limit says so; the old results are marked out of date.
  async "too-large"(page) {
    await opened(page);
    await edit(page, "#messages", sample("messages/heartrate.json"));
    const big = JSON.stringify({ deviceId: "d1", heartRate: 70, padding: "x".repeat(17 << 20) });
    await page.locator("#messages").fill(big);
    const text = await statusIs(page, "too-large");
    check(/Too large: .*at most 16777216/.test(text), `item 1: ${text}`);
    await page.locator("#stale .stale-note").waitFor();
    console.log(`ok: item 1: "${text}"`);
    await edit(page, "#messages", sample("messages/heartrate.json"));
    check(await page.locator("#stale .stale-note").count() === 0, "the stale note stays after an update");
  },

  // Item 1: the studio stopped; an edit says the server is unreachable and nothing claims "no problems".
  async unreachable(page) {
    await opened(page);
    await edit(page, "#messages", sample("messages/heartrate.json"));
    process.kill(+process.env.IOMT_STUDIO_PID, "SIGTERM");
    await new Promise((r) => setTimeout(r, 500));
    const changed = (await page.locator(fhir).inputValue()).replace("8867-4", "8867-9");
    await page.locator(fhir).fill(changed);
    const text = await statusIs(page, "unreachable");
    check(text.includes("Server unreachable") && text.includes("out of date"), `item 1: ${text}`);
    const fhirStatus = await page.locator("#fhir-status").textContent();
    check(!fhirStatus.includes("No problems"), `item 1: still "${fhirStatus}"`);
    await page.locator("#stale .stale-note").waitFor();
    console.log(`ok: item 1: "${text}"; the FHIR editor says "${fhirStatus.trim()}"`);
  },

  // Item 4: started without its files: the page names them.
  async missing(page) {
    await page.goto(url);
    await page.locator(".alert.missing").first().waitFor();
    const alerts = await page.locator(".alert.missing").allTextContents();
    check(alerts.length === 2 && alerts.some((a) => a.includes("/nope.json")), `item 4: ${alerts.join(" | ")}`);
    await statusIs(page, "ok");
    const status = await page.locator("#device-status").textContent();
    check(!status.includes("the mapping file is empty"), `item 4: "${status}"`);
    console.log(`ok: item 4: "${alerts[0]}"; the editor says "${status}"`);
  },
};

async function observation(page, code) {
  await page.waitForFunction((c) => document.getElementById("observations").textContent.includes(c), code);
  const all = await page.locator("#observations pre").allTextContents();
  return all.map((t) => JSON.parse(t)).find((o) => o.code?.coding?.some((c) => c.code === code));
}

const browser = await launch();
try {
  for (const name of which.split(",")) {
    const scenario = scenarios[name] || fail(`no scenario ${name}`);
    // A context of its own (axe-core's AxeBuilder needs a page made by a context).
    const context = await browser.newContext({ viewport: { width: 1500, height: 1000 } });
    const page = await context.newPage();
    page.setDefaultTimeout(20000);
    await scenario(page);
    await context.close();
  }
  console.log("debugger page: ok");
} finally {
  await browser.close();
}
