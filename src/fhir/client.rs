//! The FHIR REST client: read, search, conditional update, batch Bundles, authentication, and
//! retries for what can succeed later (network errors, 5xx, 429 with `Retry-After`, answers that
//! are not FHIR). Knows nothing of actors.

use super::answer::{Before, Expect, before};
use super::auth::TokenSource;
use super::{
    FhirError, FhirStore, Put, PutResult, Versioned, circuit, entry_status, history_version, outcome_text, version_of,
};
use super::{encode, parse_etag, transient_status};
use crate::config;
use crate::metrics;
use backon::{ExponentialBuilder, Retryable};
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// One request, retried while it can succeed later; 429/503 wait for `Retry-After`. A success
    /// whose body is not what `expect` says is `FhirError::Invalid`, retried the same way.
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
        expect: Expect<'_>,
    ) -> Result<Response, FhirError> {
        let attempt = || async {
            match self.request_once(method.clone(), path, body, if_match, expect).await {
                // The token was revoked or rotated: the failed request dropped it; one more try
                // fetches a fresh one before the answer counts.
                Err(FhirError::Status { status: 401, .. }) if self.token.renews() => {
                    self.request_once(method.clone(), path, body, if_match, expect).await
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
                let status = match e {
                    FhirError::Status { status, .. } => format!("HTTP {status}"),
                    FhirError::Invalid { .. } => "not FHIR".to_string(),
                    _ => "network error".to_string(),
                };
                let cause = if e.retry_after().is_some() { "retry-after" } else { "backoff" };
                metrics::get().fhir_wait_seconds.with_label_values(&[cause]).inc_by(d.as_secs_f64());
                tracing::warn!(method = %method_name(&method), %status, retry_in_ms = d.as_millis() as u64, cause, "FHIR request will be retried")
            })
            .await;
        match &result {
            Err(e) if e.retryable() => self.circuit.trip(e.summary()),
            // A write answered without any version is no sign of a server: the writer reads back.
            Ok(r) if matches!(expect, Expect::Written(_)) && r.version.is_none() && version_of(&r.body).is_none() => {}
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
        expect: Expect<'_>,
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
        if expect.minimal() {
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
            let unsendable = e.is_builder();
            let message = error_chain(&e.without_url());
            if unsendable {
                return FhirError::Unsendable { method: m, path: path.into(), message };
            }
            FhirError::Network { method: m, path: path.into(), message }
        })?;
        let status = resp.status();
        metrics::get().fhir_requests.with_label_values(&[m, status.as_str()]).inc();
        let headers = resp.headers();
        let etag = headers.get(header::ETAG).and_then(|v| v.to_str().ok()).map(parse_etag).filter(|v| !v.is_empty());
        let location = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()).and_then(history_version);
        let content_type =
            headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("none").to_string();
        let retry_after = headers.get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(retry_after);
        if status == StatusCode::UNAUTHORIZED {
            self.token.invalidate();
        }
        let bytes = resp.bytes().await.map_err(|e| FhirError::Network {
            method: m,
            path: path.into(),
            message: error_chain(&e.without_url()),
        })?;
        metrics::get().fhir_request_seconds.with_label_values(&[m]).observe(started.elapsed().as_secs_f64());
        if status.is_success() {
            let body = expect.check(status.as_u16(), &content_type, &bytes).map_err(|message| {
                metrics::get().fhir_invalid_responses.with_label_values(&[m]).inc();
                FhirError::Invalid { method: m, path: path.into(), message }
            })?;
            return Ok(Response { status: status.as_u16(), version: etag.or(location), body });
        }
        if status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Ok(Response { status: status.as_u16(), version: None, body });
        }
        let outcome = serde_json::from_slice::<Value>(&bytes)
            .map(|v| outcome_text(&v))
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(300).collect());
        Err(FhirError::Status { method: m, path: path.into(), status: status.as_u16(), outcome, retry_after })
    }

    /// POSTs `batch` Bundles of at most `fhir.max_batch_entries`, one after another; their
    /// response entries, one per entry sent, in order (a Bundle that failed: its error for each of
    /// its entries).
    async fn post_batch(&self, op: Op, entries: Vec<Value>) -> Vec<Result<Value, FhirError>> {
        let mut answers = Vec::with_capacity(entries.len());
        let mut entries = entries.into_iter().peekable();
        while entries.peek().is_some() {
            let chunk: Vec<Value> = entries.by_ref().take(self.max_batch).collect();
            let sent = chunk.len();
            metrics::get().fhir_batch_entries.with_label_values(&[op.label()]).observe(sent as f64);
            // Moved in, not through `json!`, which would serialize every entry into a copy.
            let bundle = Value::Object(serde_json::Map::from_iter([
                ("resourceType".into(), "Bundle".into()),
                ("type".into(), "batch".into()),
                ("entry".into(), Value::Array(chunk)),
            ]));
            let expect = Expect::Batch { entries: sent, minimal: op == Op::Write };
            match self.request(Method::POST, "", Some(&bundle), None, expect).await {
                // `Expect::Batch` has checked that the entries are there, one per entry sent.
                Ok(mut r) => {
                    if let Some(Value::Array(a)) = r.body.get_mut("entry").map(Value::take) {
                        answers.extend(a.into_iter().map(Ok));
                    }
                }
                Err(e) => answers.extend((0..sent).map(|_| Err(e.clone()))),
            }
        }
        answers
    }

    /// `GET metadata`: is an R4 server there and answering? Any answer that is a CapabilityStatement
    /// closes the circuit; the `fhirVersion` must be 4.0.x (this connector writes R4).
    pub async fn ping(&self) -> Result<(), FhirError> {
        let r = self.request_once(Method::GET, "metadata", None, None, Expect::Resource("CapabilityStatement")).await?;
        if r.status != 200 {
            return Err(FhirError::Invalid {
                method: "GET",
                path: "metadata".into(),
                message: format!(
                    "HTTP {} to GET metadata; a FHIR server answers it with its CapabilityStatement",
                    r.status
                ),
            });
        }
        let version = r.body.get("fhirVersion").and_then(Value::as_str).unwrap_or("none");
        if !version.starts_with("4.0") {
            return Err(FhirError::Invalid {
                method: "GET",
                path: "metadata".into(),
                message: format!(
                    "the CapabilityStatement says fhirVersion {version}; this connector writes FHIR R4 (4.0.x): check fhir.base_url"
                ),
            });
        }
        self.circuit.close();
        Ok(())
    }
}

/// The real server behind the store seam.
#[async_trait::async_trait]
impl FhirStore for FhirClient {
    /// `GET {type}/{id}`; `None` when the server has no such resource (404/410).
    async fn read(&self, resource_type: &str, id: &str) -> Result<Option<Versioned>, FhirError> {
        let path = format!("{resource_type}/{id}");
        let r = self.request(Method::GET, &path, None, None, Expect::Resource(resource_type)).await?;
        if r.status == 404 || r.status == 410 {
            return Ok(None);
        }
        let version = r.version.or_else(|| version_of(&r.body));
        Ok(Some(Versioned { version, resource: r.body }))
    }

    /// Several reads in one `batch` Bundle of GETs; one answer per id, in order (`None`: no such
    /// resource). Entries the server answered with 429 or 5xx, or with something other than the
    /// resource, are read again on their own.
    async fn read_many(
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
        let answers = self.post_batch(Op::Read, entries).await;
        let mut out = Vec::with_capacity(ids.len());
        for (id, a) in ids.iter().zip(answers) {
            let mut a = match a {
                Ok(a) => a,
                Err(e) => {
                    out.push(Err(e));
                    continue;
                }
            };
            let status = entry_status(&a);
            let etag = a.pointer("/response/etag").and_then(Value::as_str).map(parse_etag);
            let is_resource = a.pointer("/resource/resourceType").and_then(Value::as_str) == Some(resource_type);
            out.push(match status {
                200 if is_resource => {
                    let resource = a.get_mut("resource").map(Value::take).unwrap_or(Value::Null);
                    Ok(Some(Versioned { version: etag.or_else(|| version_of(&resource)), resource }))
                }
                404 | 410 => Ok(None),
                s if transient_status(s) || (200..300).contains(&s) || s == 0 => self.read(resource_type, id).await,
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

    /// What the history of `{type}/{id}` holds before `version` (from `GET {type}/{id}/_history`),
    /// whatever form the server's version ids take and in whichever order it lists them.
    async fn history_before(&self, resource_type: &str, id: &str, version: &str) -> Result<Before, FhirError> {
        let path = format!("{resource_type}/{id}/_history?_count=50");
        let r = self.request(Method::GET, &path, None, None, Expect::Resource("Bundle")).await?;
        let entries = r.body.get("entry").and_then(Value::as_array).cloned().unwrap_or_default();
        let resources: Vec<Value> = entries
            .into_iter()
            .filter_map(|mut e| e.get_mut("resource").map(Value::take))
            .filter(|r| r.get("resourceType").and_then(Value::as_str) == Some(resource_type))
            .collect();
        Ok(before(resources, version))
    }

    /// `GET {type}?{query}`: the resources of the first page.
    async fn search(&self, resource_type: &str, query: &[(&str, &str)]) -> Result<Vec<Value>, FhirError> {
        let qs: Vec<String> = query.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect();
        let path = format!("{resource_type}?{}", qs.join("&"));
        let r = self.request(Method::GET, &path, None, None, Expect::Resource("Bundle")).await?;
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
            .filter(|r| r.get("resourceType").and_then(Value::as_str) == Some(resource_type))
            .collect())
    }

    /// `PUT {type}/{id}`, with `If-Match` when `if_match` is given. Not retried on 409/412: the
    /// caller re-reads and merges. A success carries the version the server gave (etag,
    /// `Location`, or the echoed resource); `version: None` means the answer gave none, and the
    /// caller must read back before it takes the write as done.
    async fn update(
        &self,
        resource_type: &str,
        id: &str,
        resource: &Value,
        if_match: Option<&str>,
    ) -> Result<PutResult, FhirError> {
        let path = format!("{resource_type}/{id}");
        match self.request(Method::PUT, &path, Some(resource), if_match, Expect::Written(resource_type)).await {
            Ok(r) => {
                let echoed = (r.body.get("resourceType").and_then(Value::as_str) == Some(resource_type))
                    .then(|| version_of(&r.body))
                    .flatten();
                Ok(PutResult { status: r.status, version: r.version.or(echoed), outcome: None })
            }
            Err(FhirError::Status { status, outcome, .. }) if !transient_status(status) => {
                Ok(PutResult { status, version: None, outcome: Some(outcome) })
            }
            Err(e) => Err(e),
        }
    }

    /// Several PUTs in one `batch` Bundle; one result per entry, in order. Entries the server
    /// answered with 429 or 5xx are retried (with backoff) on their own.
    /// A failed Bundle fails only its own entries: what the others answered still counts.
    async fn batch(&self, puts: &[Put]) -> Vec<Result<PutResult, FhirError>> {
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
        let answers = self.post_batch(Op::Write, entries).await;
        let mut results = Vec::with_capacity(puts.len());
        for (put, a) in puts.iter().zip(answers) {
            let a = match a {
                Ok(a) => a,
                Err(e) => {
                    results.push(Err(e));
                    continue;
                }
            };
            let status = entry_status(&a);
            let result = if transient_status(status) || status == 0 {
                // Retry this entry alone; it goes through the retrying single-request path.
                self.update(put.resource_type, &put.id, &put.resource, put.if_match.as_deref()).await
            } else {
                let resp = a.get("response").cloned().unwrap_or(Value::Null);
                let echoed = a
                    .get("resource")
                    .filter(|r| r.get("resourceType").and_then(Value::as_str) == Some(put.resource_type))
                    .and_then(version_of);
                let version = resp
                    .get("etag")
                    .and_then(Value::as_str)
                    .map(parse_etag)
                    .filter(|v| !v.is_empty())
                    .or(echoed)
                    .or_else(|| resp.get("location").and_then(Value::as_str).and_then(history_version));
                let outcome = resp.get("outcome").map(outcome_text).filter(|_| status >= 400);
                Ok(PutResult { status, version, outcome })
            };
            results.push(result);
        }
        results
    }

    fn circuit(&self) -> &Arc<circuit::Circuit> {
        &self.circuit
    }

    fn max_backoff(&self) -> Duration {
        self.max_backoff
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
        }
    }
}

struct Response {
    status: u16,
    /// From the `ETag`, else the `Location`'s `_history/N`.
    version: Option<String>,
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

/// `Retry-After`: delay-seconds or an HTTP-date.
fn retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    Some((at.with_timezone(&chrono::Utc) - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO))
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
