//! The mapping debugger: a web page and the JSON endpoints behind it. Every answer comes from the
//! engine itself (parsing with positions, the cross-checks, `explain`, normalization and the
//! offline transform), so the page shows exactly what `validate`, `normalize`, `transform` and
//! the service do. Served alone by `iomt-connector studio` (no broker, no FHIR server) and, when
//! `http.debugger` is on, by `run` under `/debugger` behind `http.debugger_token`. A browser signs
//! in once with the token (a form; a session cookie after), a script sends it as a bearer token.

use crate::engine::{self, Checked};
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
}

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
/// (`engine::check`, as `validate` and the service's loads).
fn check(pair: &Pair) -> (Value, Option<(DeviceMapping, FhirMapping)>) {
    let Checked { device, fhir, report } = engine::check(&pair.device, Some(&pair.fhir), "the FHIR mapping");
    let json = json!({
        "device": problems(&report.device),
        "fhir": problems(&report.fhir),
        "cross": problems(&report.cross),
        "notes": problems(&report.notes),
    });
    let usable = fhir.filter(|_| !report.refuses()).map(|f| (device, f));
    (json, usable)
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
/// offline transform writes for all of them (Create identity, empty FHIR server).
fn run(r: &Run) -> Value {
    let pair = Pair { device: r.device.clone(), fhir: r.fhir.clone() };
    let (problems, usable) = check(&pair);
    let Some((device, fhir)) = usable else {
        return json!({"problems": problems, "messages": [], "observations": [], "errors": ["fix the mappings first"]});
    };
    let mut all = Vec::new();
    let mut messages = Vec::new();
    for (i, text) in r.messages.iter().enumerate() {
        let parsed: Result<Value, String> =
            serde_json::from_str(text).map_err(|e| format!("message {} is not valid JSON: {e}", i + 1));
        let event = parsed.map(|v| if r.envelope { v } else { envelope(v) });
        match event {
            Err(why) => messages.push(json!({"error": why, "templates": [], "measurements": []})),
            Ok(event) => {
                let templates = device.explain(&event);
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
    json!({
        "problems": problems,
        "messages": messages,
        "observations": batch.observations,
        "errors": batch.errors.iter().map(|e| format!("{e} ({})", e.kind())).collect::<Vec<_>>(),
    })
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

/// The sample mappings and messages (`mappings/`), for the page's "load samples".
async fn samples(req: HttpRequest, s: web::Data<Studio>) -> HttpResponse {
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
    HttpResponse::Ok().json(json!({
        "device": read(s.device.clone()),
        "fhir": read(s.fhir.clone()),
        "messages": messages,
    }))
}

/// The debugger's routes, for an actix-web `App` or `scope`.
pub fn routes(cfg: &mut web::ServiceConfig, studio: Studio) {
    cfg.app_data(web::Data::new(studio))
        // Mappings and messages of several MB are fine; the default JSON limit is 32 KB.
        .app_data(web::JsonConfig::default().limit(16 << 20))
        .route("/", web::get().to(page))
        .route("/signin", web::get().to(sign_in_page))
        .route("/signin", web::post().to(sign_in))
        .route("/api/check", web::post().to(check_endpoint))
        .route("/api/run", web::post().to(run_endpoint))
        .route("/api/samples", web::get().to(samples));
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
