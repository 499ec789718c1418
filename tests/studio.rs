//! The mapping debugger: its JSON endpoints, the page in headless Chromium (tests/browser, with
//! playwright-core; scripts/setup.sh installs both), and `/debugger` on the running service.

mod common;

use common::services::{self, Bed, Connector, Setup};
use serde_json::{Value, json};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// `iomt-connector studio` on a port of its own, answering.
async fn studio() -> (tokio::process::Child, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_iomt-connector"))
        .args(["studio", "--listen", &listen])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the studio: {e}"));
    let url = format!("http://{listen}/");
    let deadline = Instant::now() + Duration::from_secs(30);
    while services::http().get(&url).send().await.is_err() {
        assert!(Instant::now() < deadline, "the studio did not answer at {url}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (child, url)
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

#[tokio::test(flavor = "multi_thread")]
async fn the_page_in_headless_chromium_marks_errors_and_shows_the_observation() {
    let (_child, url) = studio().await;
    let browser = services::repo_path("tests/browser");
    assert!(
        browser.join("node_modules/playwright-core").is_dir(),
        "tests/browser/node_modules is missing: run scripts/setup.sh (npm ci there, and Debian's chromium)"
    );
    let mut cmd = std::process::Command::new("node");
    cmd.arg("debugger.mjs").arg(&url).current_dir(&browser);
    // IOMT_SCREENSHOT=docs/studio.png refreshes the README's picture.
    if let Ok(shot) = std::env::var("IOMT_SCREENSHOT") {
        cmd.arg(services::repo_path(&shot));
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("node (needed for the browser test): {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "the browser test failed:\n{text}");
    assert!(text.contains("debugger page: ok"), "{text}");
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
