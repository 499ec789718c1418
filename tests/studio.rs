//! The mapping debugger: its JSON endpoints, the page in headless Chromium (tests/browser, with
//! playwright-core; scripts/setup.sh installs both), and `/debugger` on the running service.

mod common;

use common::services::{self, Bed, Connector, Setup};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// `iomt-connector studio` on a port of its own, answering, from the repository.
async fn studio() -> (tokio::process::Child, String) {
    let (child, url, _) = studio_with(&services::repo_path(""), &[]).await;
    (child, url)
}

/// `iomt-connector studio ARGS` run in `dir`, answering; its stderr goes to the returned file.
async fn studio_with(dir: &Path, args: &[&str]) -> (tokio::process::Child, String, PathBuf) {
    let listen = format!("127.0.0.1:{}", free_port());
    let stderr = std::env::temp_dir().join(format!("iomt-studio-{}.log", listen.replace([':', '.'], "-")));
    let log = std::fs::File::create(&stderr).unwrap_or_else(|e| panic!("{e}"));
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_iomt-connector"))
        .args(["studio", "--listen", &listen])
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the studio: {e}"));
    let url = format!("http://{listen}/");
    let deadline = Instant::now() + Duration::from_secs(30);
    while services::http().get(&url).send().await.is_err() {
        assert!(Instant::now() < deadline, "the studio did not answer at {url}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (child, url, stderr)
}

/// Runs a browser script of tests/browser (`debugger.mjs URL SCENARIOS` or `debugger-run.mjs URL`)
/// in headless Chromium; its output, after asserting that it passed.
fn browser(script: &str, args: &[&str], env: &[(&str, String)]) -> String {
    let dir = services::repo_path("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").is_dir() && dir.join("node_modules/@axe-core/playwright").is_dir(),
        "tests/browser/node_modules is incomplete: run scripts/setup.sh (npm ci there, and Debian's chromium)"
    );
    let out = std::process::Command::new("node")
        .arg(script)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| panic!("node (needed for the browser test): {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "the browser test failed:\n{text}");
    text
}

/// A folder holding copies of the sample mappings, for tests that write them.
fn copies(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(services::unique(name));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let (device, fhir) = (dir.join("devicecontent.json"), dir.join("fhirmapping.json"));
    std::fs::write(&device, sample("mappings/devicecontent.json")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&fhir, sample("mappings/fhirmapping.json")).unwrap_or_else(|e| panic!("{e}"));
    (dir, device, fhir)
}

fn sample(path: &str) -> String {
    std::fs::read_to_string(services::repo_path(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

async fn post(url: &str, body: &Value) -> Value {
    let r = services::http().post(url).json(body).send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
    assert!(r.status().is_success(), "{url}: {}", r.status());
    r.json().await.unwrap_or_else(|e| panic!("{url}: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_endpoints_answer_with_the_engines_own_results() {
    let (_child, url) = studio().await;
    let (device, fhir) = (sample("mappings/devicecontent.json"), sample("mappings/fhirmapping.json"));
    let checked = post(&format!("{url}api/check"), &json!({"device": device, "fhir": fhir})).await;
    assert_eq!(checked, json!({"device": [], "fhir": [], "cross": [], "notes": []}));

    // A device type without a FHIR template: the cross-check, at the template's line.
    let lonely = device.replace("\"typeName\": \"heartrate\"", "\"typeName\": \"pulse\"");
    let checked = post(&format!("{url}api/check"), &json!({"device": lonely, "fhir": fhir})).await;
    let cross = checked["cross"].as_array().cloned().unwrap_or_default();
    assert_eq!(cross.len(), 1, "{checked}");
    assert!(cross[0]["message"].as_str().unwrap_or_default().contains("no FHIR template has this typeName"));

    let run =
        json!({"device": device, "fhir": fhir, "messages": [sample("mappings/messages/heartrate.json"), "{oops"]});
    let r = post(&format!("{url}api/run"), &run).await;
    assert!(r["messages"][1]["error"].as_str().unwrap_or_default().contains("message 2 is not valid JSON"), "{r}");
    let templates = r["messages"][0]["templates"].as_array().cloned().unwrap_or_default();
    let hr = templates.iter().find(|t| t["template"] == "CalculatedContent 'heartrate'").cloned().unwrap_or_default();
    assert!(hr["matches"].as_u64().unwrap_or(0) > 0 && hr["measurements"] == hr["matches"], "{hr}");
    let obs = r["observations"].as_array().cloned().unwrap_or_default();
    assert_eq!(obs.len(), 1, "{r}");
    assert_eq!(obs[0]["code"]["coding"][0]["code"], "8867-4");
    let samples: Value = services::http()
        .get(format!("{url}api/samples"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(samples["device"].as_str(), Some(device.as_str()));
    assert!(samples["messages"].as_array().is_some_and(|m| m.len() >= 6), "{samples}");
}

/// The walk-through (a broken mapping marked, a message to its Observation) and issue 19's items
/// 5, 6, 7 and 8, an error met while running marked at its line, opening files, and axe-core.
/// IOMT_SCREENSHOTS=docs refreshes docs/debugger-1024.png and docs/debugger-1500.png.
#[tokio::test(flavor = "multi_thread")]
async fn the_page_in_headless_chromium_marks_errors_and_shows_the_observation() {
    let (_child, url) = studio().await;
    let mut env = Vec::new();
    if let Ok(dir) = std::env::var("IOMT_SCREENSHOTS") {
        env.push(("IOMT_SCREENSHOTS", services::repo_path(&dir).display().to_string()));
    }
    let text = browser("debugger.mjs", &[&url, "basics,partial,runtime,layout,files,a11y"], &env);
    for item in
        ["item 5", "item 6", "item 7", "item 8", "missing timestamp is marked", "opened from the page", "axe-core"]
    {
        assert!(text.contains(&format!("ok: {item}")) || text.contains(item), "{item} not checked:\n{text}");
    }
}

/// `studio`'s Apply ("Save to files"): refused while the mappings have problems, then written over
/// the files it opened.
#[tokio::test(flavor = "multi_thread")]
async fn studio_saves_valid_mappings_over_the_files_it_opened() {
    let (dir, device, fhir) = copies("studio-save");
    let (d, f) = (device.display().to_string(), fhir.display().to_string());
    let messages = services::repo_path("mappings/messages").display().to_string();
    let (_child, url, _) =
        studio_with(&dir, &["--device-mapping", &d, "--fhir-mapping", &f, "--messages", &messages]).await;
    browser("debugger.mjs", &[&url, "save"], &[("IOMT_DEVICE_FILE", d.clone()), ("IOMT_FHIR_FILE", f.clone())]);
    assert_eq!(std::fs::read_to_string(&device).ok(), Some(sample("mappings/devicecontent.json")));
    let left: Vec<_> = std::fs::read_dir(&dir).into_iter().flatten().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left.len(), 2, "no temporary file is left beside the mappings: {left:?}");
}

/// Issue 19, item 1: a request past 16 MiB and a stopped studio are said so on the page, and the
/// results shown are marked out of date.
#[tokio::test(flavor = "multi_thread")]
async fn too_large_and_unreachable_are_said_and_old_results_marked_out_of_date() {
    let (child, url) = studio().await;
    let pid = child.id().unwrap_or_default().to_string();
    let text = browser("debugger.mjs", &[&url, "too-large,unreachable"], &[("IOMT_STUDIO_PID", pid)]);
    assert!(text.contains("Too large") && text.contains("Server unreachable"), "{text}");
}

/// Issue 19, item 4: started where its files are not, `studio` warns and the page names them.
#[tokio::test(flavor = "multi_thread")]
async fn missing_mapping_files_are_warned_at_start_and_on_the_page() {
    let dir = std::env::temp_dir().join(services::unique("studio-missing"));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let nope = dir.join("nope.json").display().to_string();
    let (_child, url, stderr) = studio_with(&dir, &["--device-mapping", &nope]).await;
    let warned = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(
        warned.contains(&format!("warning: cannot read the device mapping {nope}"))
            && warned.contains(&format!("the FHIR mapping {}", dir.join("mappings/fhirmapping.json").display())),
        "{warned}"
    );
    browser("debugger.mjs", &[&url, "missing"], &[]);
}

#[tokio::test(flavor = "multi_thread")]
async fn run_serves_the_debugger_only_when_asked_and_behind_its_token() {
    let Bed { system, queue, ch, _conn, .. } = services::bed("debugger").await;
    let off = Connector::start(&Setup::new(&queue, "Create", &system)).await;
    assert_eq!(off.get("/debugger/").await.0, 404, "off by default");
    drop(off);

    let mut setup = Setup::new(&queue, "Create", &system);
    setup.extra.push(("IOMT_HTTP__DEBUGGER", "true".into()));
    setup.extra.push(("IOMT_HTTP__DEBUGGER_TOKEN", "s3cret".into()));
    let c = Connector::start(&setup).await;
    let base = format!("http://{}/debugger/", c.http);
    let browser = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let r = browser.get(&base).send().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 303, "a browser without a session goes to the sign-in form");
    assert_eq!(r.headers().get("location").and_then(|l| l.to_str().ok()), Some("./signin"));
    assert_eq!(c.get("/debugger/api/samples").await.0, 401, "the endpoints ask for the token");
    let (status, body) = c.get("/debugger/api/samples?token=s3cret").await;
    assert_eq!(status, 401, "a token in the URL is not taken");
    assert!(body.contains("not taken"), "{body}");
    let wrong = browser.post(format!("{base}signin")).form(&[("token", "guess")]).send().await;
    assert_eq!(wrong.map(|r| r.status().as_u16()).ok(), Some(401), "a wrong token signs nobody in");
    let signed = browser.post(format!("{base}signin")).form(&[("token", "s3cret")]).send().await;
    let signed = signed.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(signed.status().as_u16(), 303);
    let cookie = signed.headers().get("set-cookie").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && !cookie.contains("s3cret"),
        "{cookie}"
    );
    let page = browser.get(&base).send().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(page.status().as_u16(), 200, "signed in");
    assert!(page.text().await.unwrap_or_default().contains("mapping debugger"));
    // It opens with the running mappings.
    let samples = browser.get(format!("{base}api/samples")).send().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(samples.status().as_u16(), 200);
    let samples: Value = samples.json().await.unwrap_or_default();
    assert_eq!(samples["device"].as_str(), Some(sample("mappings/devicecontent.json").as_str()));
    let r = services::http()
        .post(format!("http://{}/debugger/api/check", c.http))
        .bearer_auth("s3cret")
        .json(&json!({"device": "{", "fhir": "{}"}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 200);
    let checked: Value = r.json().await.unwrap_or_default();
    assert!(checked["device"].as_array().is_some_and(|d| !d.is_empty()), "{checked}");
    services::delete_queue(&ch, &queue).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_host_is_refused_and_the_loopback_names_are_answered() {
    let (_child, url) = studio().await;
    let port = url.trim_end_matches('/').rsplit(':').next().unwrap_or_default().to_string();
    for (host, want) in [
        (format!("localhost:{port}"), 200),
        (format!("127.0.0.1:{port}"), 200),
        (format!("evil.example:{port}"), 403),
        ("evil.example".to_string(), 403),
    ] {
        let r = services::http()
            .get(format!("{url}api/samples"))
            .header("Host", host.as_str())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(r.status().as_u16(), want, "Host: {host}");
        if want == 403 {
            let body = r.text().await.unwrap_or_default();
            assert!(body.contains("--allow-host"), "{body}");
        }
    }
}

/// Issue 19, item 3 and Apply on `/debugger` of `run`, in the browser (debugger-run.mjs): the
/// running pair and its version beside the files on disk, a refused reload named, Apply writing
/// the watched files and showing the reload. Then, by the endpoint: an invalid pair is not
/// written, and without a configured token Apply is refused and says why.
#[tokio::test(flavor = "multi_thread")]
async fn the_debugger_on_run_shows_the_running_pair_and_applies_through_the_reload() {
    let Bed { system, queue, ch, _conn, .. } = services::bed("debugger-apply").await;
    let (_dir, device, fhir) = copies("debugger-apply");
    let mut setup = Setup::new(&queue, "Create", &system);
    (setup.device_mapping, setup.fhir_mapping) = (device.clone(), fhir.clone());
    setup.extra.push(("IOMT_HTTP__DEBUGGER", "true".into()));
    setup.extra.push(("IOMT_HTTP__DEBUGGER_TOKEN", "s3cret".into()));
    let c = Connector::start(&setup).await;
    let base = format!("http://{}/", c.http);
    browser(
        "debugger-run.mjs",
        &[&base],
        &[
            ("IOMT_TOKEN", "s3cret".into()),
            ("IOMT_DEVICE_FILE", device.display().to_string()),
            ("IOMT_FHIR_FILE", fhir.display().to_string()),
        ],
    );
    let applied = std::fs::read_to_string(&fhir).unwrap_or_default();
    assert!(applied.contains("8867-4-applied"), "{applied}");

    let apply = |token: Option<&'static str>, http: String, body: Value| async move {
        let mut r = services::http().post(format!("http://{http}/debugger/api/apply")).json(&body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let r = r.send().await.unwrap_or_else(|e| panic!("{e}"));
        (r.status().as_u16(), r.json::<Value>().await.unwrap_or_default())
    };
    let (status, body) = apply(Some("s3cret"), c.http.clone(), json!({"device": "{", "fhir": applied})).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["problems"]["device"].as_array().is_some_and(|p| !p.is_empty()), "{body}");
    assert_eq!(std::fs::read_to_string(&device).ok(), Some(sample("mappings/devicecontent.json")), "not written");
    drop(c);

    let mut setup = Setup::new(&queue, "Create", &system);
    (setup.device_mapping, setup.fhir_mapping) = (device.clone(), fhir.clone());
    setup.extra.push(("IOMT_HTTP__DEBUGGER", "true".into()));
    let open = Connector::start(&setup).await;
    let pair = json!({"device": sample("mappings/devicecontent.json"), "fhir": sample("mappings/fhirmapping.json")});
    let (status, body) = apply(None, open.http.clone(), pair).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("http.debugger_token"), "{body}");
    assert_eq!(std::fs::read_to_string(&fhir).ok(), Some(applied), "not written without a token");
    services::delete_queue(&ch, &queue).await;
}
