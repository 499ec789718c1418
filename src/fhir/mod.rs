//! The FHIR REST client: read, search, conditional update, batch Bundles, authentication, and
//! retries for what can succeed later (network errors, 5xx, 429 with `Retry-After`). Knows nothing
//! of actors.

pub mod auth;
pub mod circuit;

use crate::config;
use crate::metrics;
use auth::TokenSource;
use backon::{ExponentialBuilder, Retryable};
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, thiserror::Error)]
pub enum FhirError {
    #[error("FHIR server unreachable ({method} {path}): {message}")]
    Network { method: &'static str, path: String, message: String },
    #[error("FHIR {method} {path} returned HTTP {status}: {outcome}")]
    Status { method: &'static str, path: String, status: u16, outcome: String, retry_after: Option<Duration> },
    #[error("FHIR {method} {path}: the response is not the FHIR JSON expected: {message}")]
    Decode { method: &'static str, path: String, message: String },
    #[error("FHIR authentication failed: {0}")]
    Auth(String),
}

impl FhirError {
    /// Whether the same request may succeed later: the server unreachable or timing out, 408,
    /// 429 and 5xx (but 501: the server will never implement the request).
    pub fn retryable(&self) -> bool {
        match self {
            FhirError::Network { .. } => true,
            FhirError::Status { status, .. } => transient_status(*status),
            FhirError::Decode { .. } | FhirError::Auth(_) => false,
        }
    }

    /// The method and what went wrong, without the path (it can hold device or patient
    /// identifiers): fit for logs and readiness.
    pub fn summary(&self) -> String {
        match self {
            FhirError::Network { method, message, .. } => format!("{method}: {message}"),
            FhirError::Status { method, status, .. } => format!("{method}: HTTP {status}"),
            FhirError::Decode { method, .. } => format!("{method}: unexpected response"),
            FhirError::Auth(m) => format!("authentication: {m}"),
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            FhirError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The server's `Retry-After`, when it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FhirError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A resource and the version it was read or written at.
#[derive(Debug, Clone)]
pub struct Versioned {
    pub version: Option<String>,
    pub resource: Value,
}

/// One entry of a batch Bundle: a conditional PUT.
#[derive(Debug, Clone)]
pub struct Put {
    pub resource_type: &'static str,
    pub id: String,
    pub resource: Value,
    /// The version the update is based on (`If-Match`); `None` to create.
    pub if_match: Option<String>,
}

/// What the server said about one PUT.
#[derive(Debug, Clone, PartialEq)]
pub struct PutResult {
    pub status: u16,
    pub version: Option<String>,
    /// The OperationOutcome text when the server refused.
    pub outcome: Option<String>,
}

#[derive(Clone)]
pub struct FhirClient {
    http: reqwest::Client,
    base: String,
    token: TokenSource,
    backoff: ExponentialBuilder,
    max_backoff: Duration,
    max_batch: usize,
    circuit: Arc<circuit::Circuit>,
}

/// Statuses worth retrying: 408, 429, and 5xx but 501.
pub fn transient_status(status: u16) -> bool {
    status == 408 || status == 429 || (status >= 500 && status != 501)
}

impl FhirClient {
    pub fn new(s: &config::Fhir) -> Result<FhirClient, FhirError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(s.timeout_ms))
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| FhirError::Auth(format!("cannot build the HTTP client: {e}")))?;
        let backoff = ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_millis(s.max_backoff_ms))
            .with_max_times(s.max_retries);
        Ok(FhirClient {
            token: TokenSource::new(s, http.clone()),
            http,
            base: s.base_url.trim_end_matches('/').to_string(),
            backoff,
            max_backoff: Duration::from_millis(s.max_backoff_ms),
            max_batch: s.max_batch_entries.max(1),
            circuit: Arc::default(),
        })
    }

    /// Open while the server fails transiently (see `circuit`).
    pub fn circuit(&self) -> &Arc<circuit::Circuit> {
        &self.circuit
    }

    /// The longest pause between retries (`fhir.max_backoff_ms`); a `Retry-After` is capped by it.
    pub fn max_backoff(&self) -> Duration {
        self.max_backoff
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// One request, retried while it can succeed later; 429/503 wait for `Retry-After`.
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
        answer: Answer,
    ) -> Result<Response, FhirError> {
        let attempt = || async {
            match self.request_once(method.clone(), path, body, if_match, answer).await {
                // The token was revoked or rotated: the failed request dropped it; one more try
                // fetches a fresh one before the answer counts.
                Err(FhirError::Status { status: 401, .. }) if self.token.renews() => {
                    self.request_once(method.clone(), path, body, if_match, answer).await
                }
                other => other,
            }
        };
        let result = attempt
            .retry(self.backoff)
            .sleep(tokio::time::sleep)
            .when(FhirError::retryable)
            // Retry-After replaces the next delay while retries remain, capped like any backoff.
            // Never shorter than our own backoff: a `Retry-After: 0` must not become a tight loop.
            .adjust(|e, d| d.map(|d| e.retry_after().map_or(d, |r| r.max(d).min(self.max_backoff))))
            // The path can hold device or patient identifiers: log the method and status only.
            .notify(|e, d| {
                let status = e.status().map_or_else(|| "network error".to_string(), |s| format!("HTTP {s}"));
                let cause = if e.retry_after().is_some() { "retry-after" } else { "backoff" };
                metrics::get().fhir_wait_seconds.with_label_values(&[cause]).inc_by(d.as_secs_f64());
                tracing::warn!(method = %method_name(&method), %status, retry_in_ms = d.as_millis() as u64, cause, "FHIR request will be retried")
            })
            .await;
        match &result {
            Err(e) if e.retryable() => self.circuit.trip(e.summary()),
            // Any other answer, even a refusal, means the server is there.
            Ok(_) | Err(FhirError::Status { .. }) => self.circuit.close(),
            Err(_) => {}
        }
        result
    }

    async fn request_once(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
        answer: Answer,
    ) -> Result<Response, FhirError> {
        let m = method_name(&method);
        let url = format!("{}/{}", self.base, path);
        let mut req = self.http.request(method.clone(), &url).header(header::ACCEPT, "application/fhir+json");
        if let Some(token) = self.token.token().await? {
            req = req.bearer_auth(token);
        }
        if let Some(v) = if_match {
            req = req.header(header::IF_MATCH, format!("W/\"{v}\""));
        }
        if answer == Answer::Minimal {
            req = req.header("Prefer", "return=minimal");
        }
        if let Some(b) = body {
            let bytes = serde_json::to_vec(b).map_err(|e| FhirError::Decode {
                method: m,
                path: path.into(),
                message: e.to_string(),
            })?;
            req = req.header(header::CONTENT_TYPE, "application/fhir+json").body(bytes);
        }
        let started = Instant::now();
        let resp = req.send().await.map_err(|e| {
            metrics::get().fhir_requests.with_label_values(&[m, "error"]).inc();
            // Without the URL: it can hold device or patient identifiers, and this text is logged
            // and shown by readiness.
            FhirError::Network { method: m, path: path.into(), message: error_chain(&e.without_url()) }
        })?;
        let status = resp.status();
        metrics::get().fhir_requests.with_label_values(&[m, status.as_str()]).inc();
        let etag =
            resp.headers().get(header::ETAG).and_then(|v| v.to_str().ok()).map(parse_etag).or_else(|| {
                resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()).and_then(history_version)
            });
        let retry_after = resp.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(retry_after);
        if status == StatusCode::UNAUTHORIZED {
            self.token.invalidate();
        }
        let bytes = resp.bytes().await.map_err(|e| FhirError::Network {
            method: m,
            path: path.into(),
            message: error_chain(&e.without_url()),
        })?;
        metrics::get().fhir_request_seconds.with_label_values(&[m]).observe(started.elapsed().as_secs_f64());
        if status.is_success() || status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
            let body =
                if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
            return Ok(Response { status: status.as_u16(), etag, body });
        }
        let outcome = serde_json::from_slice::<Value>(&bytes)
            .map(|v| outcome_text(&v))
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(300).collect());
        Err(FhirError::Status { method: m, path: path.into(), status: status.as_u16(), outcome, retry_after })
    }

    /// `GET {type}/{id}`; `None` when the server has no such resource (404/410).
    pub async fn read(&self, resource_type: &str, id: &str) -> Result<Option<Versioned>, FhirError> {
        let r = self.request(Method::GET, &format!("{resource_type}/{id}"), None, None, Answer::Resource).await?;
        if r.status == 404 || r.status == 410 {
            return Ok(None);
        }
        let version = r.etag.or_else(|| version_of(&r.body));
        Ok(Some(Versioned { version, resource: r.body }))
    }

    /// Several reads in one `batch` Bundle of GETs; one answer per id, in order (`None`: no such
    /// resource). Entries the server answered with 429 or 5xx are read again on their own.
    pub async fn read_many(
        &self,
        resource_type: &str,
        ids: &[String],
    ) -> Result<Vec<Result<Option<Versioned>, FhirError>>, FhirError> {
        match ids.len() {
            0 => return Ok(Vec::new()),
            1 => return Ok(vec![self.read(resource_type, &ids[0]).await]),
            _ => {}
        }
        let entries: Vec<Value> = ids
            .iter()
            .map(|id| json!({"request": {"method": "GET", "url": format!("{resource_type}/{id}")}}))
            .collect();
        let answers = self.post_batch("read", entries).await?;
        let mut out = Vec::with_capacity(ids.len());
        for (id, mut a) in ids.iter().zip(answers) {
            let status = entry_status(&a);
            let etag = a.pointer("/response/etag").and_then(Value::as_str).map(parse_etag);
            out.push(match status {
                200 => {
                    let resource = a.get_mut("resource").map(Value::take).unwrap_or(Value::Null);
                    Ok(Some(Versioned { version: etag.or_else(|| version_of(&resource)), resource }))
                }
                404 | 410 => Ok(None),
                s if transient_status(s) || s == 0 => self.read(resource_type, id).await,
                s => Err(FhirError::Status {
                    method: "GET",
                    path: format!("{resource_type}/{id}"),
                    status: s,
                    outcome: a.pointer("/response/outcome").map(outcome_text).unwrap_or_default(),
                    retry_after: None,
                }),
            });
        }
        Ok(out)
    }

    /// The version written just before `version` (from `GET {type}/{id}/_history`, newest first),
    /// whatever form the server's version ids take. `None` when the history does not show it.
    pub async fn version_before(
        &self,
        resource_type: &str,
        id: &str,
        version: &str,
    ) -> Result<Option<Versioned>, FhirError> {
        let r = self
            .request(Method::GET, &format!("{resource_type}/{id}/_history?_count=50"), None, None, Answer::Resource)
            .await?;
        let entries = r.body.get("entry").and_then(Value::as_array).cloned().unwrap_or_default();
        let resources: Vec<&Value> =
            entries.iter().filter_map(|e| e.get("resource")).filter(|r| r.get("resourceType").is_some()).collect();
        let ours = resources.iter().position(|r| version_of(r).as_deref() == Some(version));
        Ok(ours
            .and_then(|i| resources.get(i + 1))
            .map(|r| Versioned { version: version_of(r), resource: (*r).clone() }))
    }

    /// `GET {type}?{query}`: the resources of the first page.
    pub async fn search(&self, resource_type: &str, query: &[(&str, &str)]) -> Result<Vec<Value>, FhirError> {
        let qs: Vec<String> = query.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect();
        let path = format!("{resource_type}?{}", qs.join("&"));
        let r = self.request(Method::GET, &path, None, None, Answer::Resource).await?;
        if r.status == 404 {
            return Err(FhirError::Status {
                method: "GET",
                path,
                status: 404,
                outcome: "search not supported".into(),
                retry_after: None,
            });
        }
        let entries = r.body.get("entry").and_then(Value::as_array).cloned().unwrap_or_default();
        Ok(entries
            .into_iter()
            .filter(|e| e.pointer("/search/mode").and_then(Value::as_str).is_none_or(|m| m == "match"))
            .filter_map(|mut e| e.get_mut("resource").map(Value::take))
            .collect())
    }

    /// `PUT {type}/{id}`, with `If-Match` when `if_match` is given. Not retried on 409/412: the
    /// caller re-reads and merges.
    pub async fn update(
        &self,
        resource_type: &str,
        id: &str,
        resource: &Value,
        if_match: Option<&str>,
    ) -> Result<PutResult, FhirError> {
        let path = format!("{resource_type}/{id}");
        match self.request(Method::PUT, &path, Some(resource), if_match, Answer::Minimal).await {
            Ok(r) => Ok(PutResult { status: r.status, version: r.etag.or_else(|| version_of(&r.body)), outcome: None }),
            Err(FhirError::Status { status, outcome, .. }) if !transient_status(status) => {
                Ok(PutResult { status, version: None, outcome: Some(outcome) })
            }
            Err(e) => Err(e),
        }
    }

    /// Several PUTs in one `batch` Bundle; one result per entry, in order. Entries the server
    /// answered with 429 or 5xx are retried (with backoff) on their own.
    pub async fn batch(&self, puts: &[Put]) -> Result<Vec<PutResult>, FhirError> {
        let entries: Vec<Value> = puts
            .iter()
            .map(|p| {
                let mut request = json!({"method": "PUT", "url": format!("{}/{}", p.resource_type, p.id)});
                if let Some(v) = &p.if_match {
                    request["ifMatch"] = json!(format!("W/\"{v}\""));
                }
                // A clone, not `json!`: the macro would serialize the Observation into its copy.
                Value::Object(serde_json::Map::from_iter([
                    ("fullUrl".into(), format!("{}/{}/{}", self.base, p.resource_type, p.id).into()),
                    ("resource".into(), p.resource.clone()),
                    ("request".into(), request),
                ]))
            })
            .collect();
        let answers = self.post_batch("write", entries).await?;
        let mut results = Vec::with_capacity(puts.len());
        for (put, a) in puts.iter().zip(answers) {
            let resp = a.get("response").cloned().unwrap_or(Value::Null);
            let status = entry_status(&a);
            let result = if transient_status(status) || status == 0 {
                // Retry this entry alone; it goes through the retrying single-request path.
                self.update(put.resource_type, &put.id, &put.resource, put.if_match.as_deref()).await?
            } else {
                let version = resp
                    .get("etag")
                    .and_then(Value::as_str)
                    .map(parse_etag)
                    .or_else(|| a.get("resource").and_then(version_of))
                    .or_else(|| resp.get("location").and_then(Value::as_str).and_then(history_version));
                let outcome = resp.get("outcome").map(outcome_text).filter(|_| status >= 400);
                PutResult { status, version, outcome }
            };
            results.push(result);
        }
        Ok(results)
    }

    /// POSTs `batch` Bundles of at most `fhir.max_batch_entries`, one after another; their
    /// response entries, one per entry sent, in order.
    async fn post_batch(&self, op: &'static str, entries: Vec<Value>) -> Result<Vec<Value>, FhirError> {
        let mut answers = Vec::with_capacity(entries.len());
        let mut entries = entries.into_iter().peekable();
        while entries.peek().is_some() {
            let chunk: Vec<Value> = entries.by_ref().take(self.max_batch).collect();
            let sent = chunk.len();
            metrics::get().fhir_batch_entries.with_label_values(&[op]).observe(sent as f64);
            // Moved in, not through `json!`, which would serialize every entry into a copy.
            let bundle = Value::Object(serde_json::Map::from_iter([
                ("resourceType".into(), "Bundle".into()),
                ("type".into(), "batch".into()),
                ("entry".into(), Value::Array(chunk)),
            ]));
            let answer = if op == "write" { Answer::Minimal } else { Answer::Resource };
            let mut r = self.request(Method::POST, "", Some(&bundle), None, answer).await?;
            let got = match r.body.get_mut("entry").map(Value::take) {
                Some(Value::Array(a)) => a,
                _ => Vec::new(),
            };
            if got.len() != sent {
                return Err(FhirError::Decode {
                    method: "POST",
                    path: "(batch)".into(),
                    message: format!("{} entries answered for {sent} sent", got.len()),
                });
            }
            answers.extend(got);
        }
        Ok(answers)
    }

    /// `GET metadata`: is the server there and answering? An answer closes the circuit.
    pub async fn ping(&self) -> Result<(), FhirError> {
        let r = self.request_once(Method::GET, "metadata", None, None, Answer::Resource).await.map(|_| ());
        if r.is_ok() {
            self.circuit.close();
        }
        r
    }
}

/// What a request asks the server to send back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// The resource (reads, searches).
    Resource,
    /// Only the status and the new version (`Prefer: return=minimal`): a write never uses the
    /// resource echoed back, and the server need not build and send it (an Observation of a
    /// SampledData window is several KB).
    Minimal,
}

struct Response {
    status: u16,
    etag: Option<String>,
    body: Value,
}

fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        _ => "OTHER",
    }
}

/// The HTTP status of a batch-response entry (`"201 Created"` → 201; 0 when absent).
fn entry_status(entry: &Value) -> u16 {
    entry
        .pointer("/response/status")
        .and_then(Value::as_str)
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// `Retry-After`: delay-seconds or an HTTP-date.
fn retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    Some((at.with_timezone(&chrono::Utc) - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO))
}

/// `W/"3"` → `3`.
pub fn parse_etag(s: &str) -> String {
    s.trim().trim_start_matches("W/").trim_matches('"').to_string()
}

/// `Observation/x/_history/3` (a write's `Location`) → `3`.
fn history_version(location: &str) -> Option<String> {
    let (_, v) = location.rsplit_once("/_history/")?;
    let v = v.trim_end_matches('/');
    (!v.is_empty() && !v.contains('/')).then(|| v.to_string())
}

fn version_of(resource: &Value) -> Option<String> {
    resource.pointer("/meta/versionId").and_then(Value::as_str).map(str::to_string)
}

/// The human text of an OperationOutcome (its issues' diagnostics or details).
pub fn outcome_text(v: &Value) -> String {
    let issues = v.get("issue").and_then(Value::as_array).cloned().unwrap_or_default();
    let texts: Vec<String> = issues
        .iter()
        .filter_map(|i| {
            i.get("diagnostics")
                .and_then(Value::as_str)
                .or_else(|| i.pointer("/details/text").and_then(Value::as_str))
                .map(str::to_string)
        })
        .collect();
    if texts.is_empty() { v.to_string().chars().take(300).collect() } else { texts.join("; ") }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Percent-encodes a query or form value (identifier values may hold anything).
pub fn encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A FHIR search token `system|value`, escaping the characters search syntax reserves.
pub fn token(system: Option<&str>, value: &str) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace('|', "\\|").replace(',', "\\,").replace('$', "\\$");
    match system {
        Some(s) => format!("{}|{}", esc(s), esc(value)),
        None => esc(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_and_tokens() {
        assert_eq!(parse_etag("W/\"12\""), "12");
        assert_eq!(history_version("http://h/fhir/Observation/a-1/_history/7").as_deref(), Some("7"));
        assert_eq!(history_version("Observation/a-1"), None);
        assert_eq!(token(Some("urn:x"), "a|b,c"), "urn:x|a\\|b\\,c");
        assert_eq!(encode("urn:x|a b"), "urn%3Ax%7Ca%20b");
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date_and_transient_statuses_are_named() {
        assert_eq!(retry_after(" 3 "), Some(Duration::from_secs(3)));
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        assert_eq!(retry_after("soon"), None);
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(transient_status(s), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 412, 422, 501] {
            assert!(!transient_status(s), "{s}");
        }
    }

    #[test]
    fn outcome_text_reads_diagnostics() {
        let v = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "diagnostics": "status is required"}]});
        assert_eq!(outcome_text(&v), "status is required");
    }
}
