//! The mapping debugger: a web page and the JSON endpoints behind it. Every answer comes from the
//! engine itself (parsing with positions, the cross-checks, `explain`, normalization and the
//! offline transform), so the page shows exactly what `validate`, `normalize`, `transform` and
//! the service do. Served alone by `iomt-connector studio` (no broker, no FHIR server) and, when
//! `http.debugger` is on, by `run` under `/debugger` behind `http.debugger_token`. A browser signs
//! in once with the token (a form; a session cookie after), a script sends it as a bearer token.

use crate::engine::{self, Checked};
use crate::pipeline::mappings::{Live, write_atomically};
use crate::template::TemplateError;
use crate::template::device::{DeviceMapping, envelope};
use crate::template::fhir::FhirMapping;
use crate::transform::{CreateIdentity, transform};
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::PathBuf;

/// The page: one file, no build step, embedded in the binary.
const PAGE: &str = include_str!("studio/index.html");

/// The mappings the page opens with (the running ones under `run`), sample messages, and the
/// token that guards the endpoints (empty: none).
#[derive(Clone)]
pub struct Studio {
    pub device: PathBuf,
    pub fhir: PathBuf,
    /// A folder of `*.json` messages offered as samples.
    pub messages: PathBuf,
    pub token: String,
    /// Host names answered besides the loopback ones.
    pub hosts: Vec<String>,
    /// What the sign-in cookie carries: random, made at start, so a session ends with the process
    /// and the token itself never travels in a cookie or a URL.
    pub session: std::sync::Arc<String>,
    /// Under `run`: the running pair, the last refusal and the watched files. `None` for `studio`,
    /// which shows and writes the files it was given.
    pub live: Option<Live>,
}

/// The largest request the endpoints take (mappings plus messages).
const LIMIT: usize = 16 << 20;

/// The sign-in cookie's name.
const COOKIE: &str = "iomt_debugger";

/// A session value for `Studio::session`.
pub fn new_session() -> std::sync::Arc<String> {
    let bytes: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
    std::sync::Arc::new(hex::encode(bytes))
}

/// Compares by digest, so the time taken says nothing of how much of a guess was right.
fn same_secret(a: &str, b: &str) -> bool {
    use sha2::{Digest, Sha256};
    Sha256::digest(a.as_bytes()) == Sha256::digest(b.as_bytes())
}

fn problems(errors: &[TemplateError]) -> Vec<Value> {
    errors.iter().map(|e| json!({"line": e.line, "column": e.column, "message": e.to_string()})).collect()
}

#[derive(Deserialize)]
struct Pair {
    device: String,
    fhir: String,
}

/// Every problem of both mappings with its line and column, and the cross-checks when both parse
/// (`engine::check`, as `validate` and the service's loads); and both mappings as far as they
/// load, with whether that is all of them (the service would refuse the pair otherwise).
fn check(pair: &Pair) -> (Value, DeviceMapping, FhirMapping, bool) {
    let Checked { device, fhir, report } = engine::check(&pair.device, Some(&pair.fhir), "the FHIR mapping");
    let json = json!({
        "device": problems(&report.device),
        "fhir": problems(&report.fhir),
        "cross": problems(&report.cross),
        "notes": problems(&report.notes),
    });
    (json, device, fhir.unwrap_or_default(), !report.refuses())
}

#[derive(Deserialize)]
struct Run {
    device: String,
    fhir: String,
    /// Message texts: bodies, or whole envelopes with `envelope`.
    messages: Vec<String>,
    #[serde(default)]
    envelope: bool,
    #[serde(default, rename = "deviceIdentifierSystem")]
    device_identifier_system: Option<String>,
}

/// Each message's envelope, per-template explanation and measurements; then the Observations the
/// offline transform writes for all of them (Create identity, empty FHIR server). A template with a
/// problem is left out and the others still run: one typo should not hide every result, but the
/// answer says the results are partial, since the service would refuse such a pair.
fn run(r: &Run) -> Value {
    let pair = Pair { device: r.device.clone(), fhir: r.fhir.clone() };
    let (problems, device, fhir, whole) = check(&pair);
    let mut all = Vec::new();
    let mut messages = Vec::new();
    for (i, text) in r.messages.iter().enumerate() {
        let parsed: Result<Value, String> =
            serde_json::from_str(text).map_err(|e| format!("message {} is not valid JSON: {e}", i + 1));
        let event = parsed.map(|v| if r.envelope { v } else { envelope(v) });
        match event {
            Err(why) => messages.push(json!({"error": why, "templates": [], "measurements": []})),
            Ok(event) => {
                let templates = located(device.explain(&event), &r.device);
                let (measurements, error) = match device.normalize(&event) {
                    Ok(ms) => (ms, None),
                    Err(e) => (Vec::new(), Some(format!("{} ({})", e, e.kind()))),
                };
                messages.push(json!({"error": error, "templates": templates, "measurements": measurements}));
                all.extend(measurements);
            }
        }
    }
    let identity = CreateIdentity { device_system: r.device_identifier_system.clone().filter(|s| !s.is_empty()) };
    let batch = transform(&fhir, all, &identity, chrono::Utc::now());
    let partial = (!whole).then(|| {
        format!(
            "the mappings have problems: these results come from the templates that load ({} device, {} FHIR); \
             the service would refuse this pair",
            device.templates.len(),
            fhir.templates.len()
        )
    });
    json!({
        "problems": problems,
        "partial": partial,
        "messages": messages,
        "observations": batch.observations,
        "errors": batch.errors.iter().map(|e| format!("{e} ({})", e.kind())).collect::<Vec<_>>(),
    })
}

/// Each report with `errorLine`: the line of the device mapping holding the expression that failed
/// (the first line from the template's own that quotes it; the template's line when none does,
/// as for the IoT kinds' fixed expressions), so the page marks it in the editor.
fn located(reports: Vec<crate::template::device::TemplateReport>, text: &str) -> Vec<Value> {
    let lines: Vec<&str> = text.lines().collect();
    reports
        .into_iter()
        .map(|t| {
            let line = t.error_expression.as_ref().map(|e| {
                let quoted = serde_json::to_string(e).unwrap_or_default();
                let from = t.line.saturating_sub(1);
                lines.iter().skip(from).position(|l| l.contains(&quoted)).map_or(t.line, |i| from + i + 1)
            });
            let mut v = serde_json::to_value(&t).unwrap_or_default();
            if t.error.is_some() {
                v["errorLine"] = json!(line.unwrap_or(t.line));
            }
            v
        })
        .collect()
}

/// The request's `Host` is a loopback name or one of `hosts`; anything else may be a page of
/// another site that made its own name resolve here (DNS rebinding).
fn host_allowed(req: &HttpRequest, s: &Studio) -> bool {
    let Some(host) = req.headers().get("host").and_then(|v| v.to_str().ok()) else { return false };
    let name = match host.rsplit_once(':') {
        // `[::1]:8181`, `localhost:8181`; a bare `::1` has colons but no port.
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) && !name.ends_with(':') => name,
        _ => host,
    };
    let name = name.to_ascii_lowercase();
    ["localhost", "127.0.0.1", "[::1]"].contains(&name.as_str())
        || s.hosts.iter().any(|h| h.eq_ignore_ascii_case(&name))
}

/// Signed in: the token as `Authorization: Bearer` (scripts), or the cookie the sign-in page sets
/// (the browser). Never from the query string, which proxies and browser histories keep.
fn allowed(req: &HttpRequest, s: &Studio) -> bool {
    if !host_allowed(req, s) {
        return false;
    }
    if s.token.is_empty() {
        return true;
    }
    let bearer =
        req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if bearer.is_some_and(|b| same_secret(b, &s.token)) {
        return true;
    }
    req.cookie(COOKIE).is_some_and(|c| same_secret(c.value(), &s.session))
}

fn refused(req: &HttpRequest, s: &Studio) -> HttpResponse {
    if !host_allowed(req, s) {
        let host = req.headers().get("host").and_then(|v| v.to_str().ok()).unwrap_or("none");
        return HttpResponse::Forbidden().json(json!({"error": format!(
            "Host '{host}' is not one the debugger answers: add the name to http.debugger_hosts (run) or --allow-host (studio)"
        )}));
    }
    let mut why = "the debugger needs its token (http.debugger_token or --token): sign in at ./signin, or send \
                   Authorization: Bearer <token>"
        .to_string();
    if req.query_string().split('&').any(|p| p.starts_with("token=")) {
        why.push_str("; a token in the URL is not taken (proxies and browser histories keep URLs)");
    }
    HttpResponse::Unauthorized().json(json!({ "error": why }))
}

/// The sign-in form (the token typed in, posted, never put in a URL).
const SIGN_IN: &str = include_str!("studio/signin.html");

async fn sign_in_page(req: HttpRequest, s: web::Data<Studio>) -> HttpResponse {
    if !host_allowed(&req, &s) {
        return refused(&req, &s);
    }
    HttpResponse::Ok().content_type("text/html; charset=utf-8").body(SIGN_IN.replace("{{failed}}", ""))
}

#[derive(Deserialize)]
struct SignIn {
    token: String,
}

/// Checks the typed token; sets the session cookie (HttpOnly: no script reads it; SameSite=Strict:
/// no other site's page sends it) scoped to the debugger's path, and goes to the page.
async fn sign_in(req: HttpRequest, s: web::Data<Studio>, form: web::Form<SignIn>) -> HttpResponse {
    if !host_allowed(&req, &s) {
        return refused(&req, &s);
    }
    if s.token.is_empty() || !same_secret(&form.token, &s.token) {
        let page = SIGN_IN.replace("{{failed}}", "<p role=\"alert\" class=\"failed\">That is not the token.</p>");
        return HttpResponse::Unauthorized().content_type("text/html; charset=utf-8").body(page);
    }
    let path = req.path().strip_suffix("signin").unwrap_or("/").to_string();
    let cookie = actix_web::cookie::Cookie::build(COOKIE, s.session.as_str())
        .path(path.clone())
        .http_only(true)
        .same_site(actix_web::cookie::SameSite::Strict)
        .finish();
    HttpResponse::SeeOther().cookie(cookie).insert_header(("location", path)).finish()
}

async fn page(req: HttpRequest, s: web::Data<Studio>) -> HttpResponse {
    if host_allowed(&req, &s) && !allowed(&req, &s) {
        // A browser without the cookie: to the sign-in form, relative to wherever the page is.
        return HttpResponse::SeeOther().insert_header(("location", "./signin")).finish();
    }
    if !allowed(&req, &s) {
        return refused(&req, &s);
    }
    HttpResponse::Ok().content_type("text/html; charset=utf-8").body(PAGE)
}

async fn check_endpoint(req: HttpRequest, s: web::Data<Studio>, body: web::Json<Pair>) -> HttpResponse {
    if !allowed(&req, &s) {
        return refused(&req, &s);
    }
    HttpResponse::Ok().json(check(&body).0)
}

async fn run_endpoint(req: HttpRequest, s: web::Data<Studio>, body: web::Json<Run>) -> HttpResponse {
    if !allowed(&req, &s) {
        return refused(&req, &s);
    }
    HttpResponse::Ok().json(run(&body))
}

/// The mapping files: under `run` the watched ones, for `studio` the ones it was given.
fn files(s: &Studio) -> (PathBuf, PathBuf) {
    match &s.live {
        Some(live) => (live.settings.mappings.device.clone(), live.settings.mappings.fhir.clone()),
        None => (s.device.clone(), s.fhir.clone()),
    }
}

/// A path as the user should read it: absolute, since a relative default (`mappings/…`) is
/// resolved against a working directory the user may not have in mind.
fn shown(p: &std::path::Path) -> String {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string()
}

/// The mapping files that cannot be read, each with why; the page and `studio`'s start say so
/// instead of opening an empty editor that reports "the mapping file is empty".
pub fn missing(device: &std::path::Path, fhir: &std::path::Path) -> Vec<String> {
    [("device", device), ("FHIR", fhir)]
        .into_iter()
        .filter_map(|(what, p)| {
            std::fs::read_to_string(p).err().map(|e| format!("the {what} mapping {}: {e}", shown(p)))
        })
        .collect()
}

/// What the page shows above the editors: the running pair (under `run`), the files on disk, the
/// last refusal, and whether Apply is possible and where it writes.
fn state(s: &Studio) -> Value {
    let (device, fhir) = files(s);
    let texts = (std::fs::read_to_string(&device), std::fs::read_to_string(&fhir));
    let disk_version = match &texts {
        (Ok(d), Ok(f)) => Some(engine::version(d, f)),
        _ => None,
    };
    let running = s.live.as_ref().map(|l| l.current.get());
    let apply = match (&s.live, s.token.is_empty()) {
        (Some(_), true) => {
            json!({"available": false, "why": "Apply needs a token: set http.debugger_token (the debugger then asks for it)"})
        }
        _ => json!({"available": true}),
    };
    json!({
        "mode": if s.live.is_some() { "run" } else { "studio" },
        "running": running.map(|m| json!({"version": m.version})),
        "disk": {"device": shown(&device), "fhir": shown(&fhir), "version": disk_version},
        "missing": missing(&device, &fhir),
        "refused": s.live.as_ref().and_then(|l| l.refused()),
        "apply": apply,
    })
}

async fn state_endpoint(req: HttpRequest, s: web::Data<Studio>) -> HttpResponse {
    if !allowed(&req, &s) {
        return refused(&req, &s);
    }
    HttpResponse::Ok().json(state(&s))
}

#[derive(Deserialize)]
struct Open {
    /// `running` (the pair in force, under `run`) or `disk`.
    #[serde(default)]
    from: String,
}

/// The mappings the page opens with (the running pair under `run`, else the files; `?from=disk`
/// the files), the sample messages, and `state`.
async fn samples(req: HttpRequest, s: web::Data<Studio>, q: web::Query<Open>) -> HttpResponse {
    if !allowed(&req, &s) {
        return refused(&req, &s);
    }
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    let mut messages = Vec::new();
    if let Ok(dir) = std::fs::read_dir(&s.messages) {
        let mut files: Vec<PathBuf> =
            dir.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "json")).collect();
        files.sort();
        for f in files {
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            messages.push(json!({"name": name, "text": read(f)}));
        }
    }
    let (device, fhir) = match s.live.as_ref().filter(|_| q.from != "disk") {
        Some(live) => {
            let m = live.current.get();
            (m.device_text.clone(), m.fhir_text.clone())
        }
        None => {
            let (d, f) = files(&s);
            (read(d), read(f))
        }
    };
    HttpResponse::Ok().json(json!({"device": device, "fhir": fhir, "messages": messages, "state": state(&s)}))
}

/// Validates the pair with the engine (as the service's load: problems refuse it, cross-check
/// findings do not) and writes it over the mapping files, each atomically. Under `run` only with a
/// token configured (writing the service's mappings is more than reading them), and the service
/// reloads it at once: the answer carries the reload's result.
async fn apply(req: HttpRequest, s: web::Data<Studio>, body: web::Json<Pair>) -> HttpResponse {
    if !allowed(&req, &s) {
        return refused(&req, &s);
    }
    if s.live.is_some() && s.token.is_empty() {
        return HttpResponse::Forbidden().json(json!({"error":
            "Apply is off: it writes the running service's mapping files, so it needs http.debugger_token to be set"}));
    }
    let (problems, _, _, whole) = check(&body);
    if !whole {
        return HttpResponse::UnprocessableEntity().json(json!({
            "error": "not written: the mappings have problems (marked in the editors); the service would refuse them",
            "problems": problems,
        }));
    }
    let (device, fhir) = files(&s);
    let version = engine::version(&body.device, &body.fhir);
    let written = json!([shown(&device), shown(&fhir)]);
    let result = match &s.live {
        Some(live) => live.apply(&body.device, &body.fhir).map(|r| serde_json::to_value(r).unwrap_or_default()),
        None => write_atomically(&device, &body.device)
            .and_then(|_| write_atomically(&fhir, &body.fhir))
            .map(|_| json!({"reload": "none"})),
    };
    match result {
        Ok(mut r) => {
            r["written"] = written;
            r["fileVersion"] = json!(version);
            HttpResponse::Ok().json(r)
        }
        Err(e) => HttpResponse::InternalServerError().json(json!({"error": e.to_string()})),
    }
}

/// A body the JSON extractor refuses, answered in JSON with its reason; past the limit that is
/// 413 and says the limit, so the page can tell "too large" from a broken server.
fn json_error(err: actix_web::error::JsonPayloadError, _: &HttpRequest) -> actix_web::Error {
    use actix_web::error::{InternalError, JsonPayloadError};
    let response = match &err {
        JsonPayloadError::OverflowKnownLength { length, limit } => HttpResponse::PayloadTooLarge().json(json!({
            "error": format!("the request is {length} bytes; the debugger takes at most {limit} (mappings and messages together)")
        })),
        JsonPayloadError::Overflow { limit } => HttpResponse::PayloadTooLarge()
            .json(json!({"error": format!("the request is over {limit} bytes, the most the debugger takes")})),
        other => HttpResponse::BadRequest().json(json!({"error": other.to_string()})),
    };
    InternalError::from_response(err, response).into()
}

/// The debugger's routes, for an actix-web `App` or `scope`.
pub fn routes(cfg: &mut web::ServiceConfig, studio: Studio) {
    cfg.app_data(web::Data::new(studio))
        // Mappings and messages of several MB are fine; the default JSON limit is 32 KB.
        .app_data(web::JsonConfig::default().limit(LIMIT).error_handler(json_error))
        .route("/", web::get().to(page))
        .route("/signin", web::get().to(sign_in_page))
        .route("/signin", web::post().to(sign_in))
        .route("/api/check", web::post().to(check_endpoint))
        .route("/api/run", web::post().to(run_endpoint))
        .route("/api/samples", web::get().to(samples))
        .route("/api/state", web::get().to(state_endpoint))
        .route("/api/apply", web::post().to(apply));
}

/// `iomt-connector studio`: the debugger alone, until SIGINT/SIGTERM.
pub fn serve(listen: &str, studio: Studio) -> std::io::Result<()> {
    let system = actix_rt::System::new();
    system.block_on(async move {
        let server = actix_web::HttpServer::new(move || {
            let s = studio.clone();
            actix_web::App::new().configure(move |cfg| routes(cfg, s))
        })
        .workers(1)
        .bind(listen)?
        .run();
        eprintln!("iomt-connector studio: http://{listen}/");
        server.await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> String {
        let path = format!("{}/mappings/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn a_broken_template_leaves_the_others_running_and_says_so() {
        let device = sample("devicecontent.json").replacen("CalculatedContent", "CalculatedContnet", 1);
        let r = run(&Run {
            device,
            fhir: sample("fhirmapping.json"),
            messages: vec![sample("messages/spo2.json")],
            envelope: false,
            device_identifier_system: None,
        });
        assert!(r["partial"].as_str().is_some_and(|p| p.contains("templates that load")), "{r}");
        let codes: Vec<&str> = r["observations"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o["code"]["coding"][0]["code"].as_str())
            .collect();
        assert_eq!(codes, ["59408-5"], "{r}");
    }

    #[test]
    fn an_error_met_while_running_is_located_at_its_expressions_line() {
        let device = sample("devicecontent.json");
        let r = run(&Run {
            device: device.clone(),
            fhir: sample("fhirmapping.json"),
            messages: vec![r#"{"deviceId": "d1", "heartRate": 70}"#.into()],
            envelope: false,
            device_identifier_system: None,
        });
        let failed = r["messages"][0]["templates"].as_array().into_iter().flatten().find(|t| !t["error"].is_null());
        let line = failed.and_then(|t| t["errorLine"].as_u64()).unwrap_or_default() as usize;
        let text = device.lines().nth(line.saturating_sub(1)).unwrap_or_default();
        assert!(text.contains("\"timestampExpression\""), "line {line}: {text}");
        assert!(r["partial"].is_null(), "{r}");
    }

    #[test]
    fn a_write_replaces_the_file_whole_and_leaves_nothing_beside_it() {
        let dir = std::env::temp_dir().join(format!("iomt-studio-write-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let file = dir.join("m.json");
        std::fs::write(&file, "old").unwrap_or_else(|e| panic!("{e}"));
        write_atomically(&file, "new").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(std::fs::read_to_string(&file).ok().as_deref(), Some("new"));
        assert_eq!(std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or_default(), 1);
        let missing = write_atomically(&dir.join("no/such/dir/m.json"), "x").err().map(|e| e.to_string());
        assert!(missing.is_some_and(|e| e.contains("cannot write")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
