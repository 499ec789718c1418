//! The FHIR REST client: read, search, conditional update, batch Bundles, authentication, and
//! retries for what can succeed later (network errors, 5xx, 429 with `Retry-After`). Knows nothing
//! of actors.

pub mod answer;
pub mod auth;
pub mod circuit;
mod client;
pub mod memory;
pub mod store;

pub use answer::Before;
pub use client::FhirClient;
pub use store::{DryRun, FhirStore};

use serde_json::Value;
use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error)]
pub enum FhirError {
    #[error("FHIR server unreachable ({method} {path}): {message}")]
    Network { method: &'static str, path: String, message: String },
    #[error("FHIR {method} {path} returned HTTP {status}: {outcome}")]
    Status { method: &'static str, path: String, status: u16, outcome: String, retry_after: Option<Duration> },
    #[error("FHIR {method} {path}: the response is not the FHIR JSON expected: {message}")]
    Decode { method: &'static str, path: String, message: String },
    /// A success that is not FHIR (an HTML page, an empty or truncated body, another resource
    /// type, a batch answer with the wrong number of entries), or a write with no evidence of a
    /// version: a fault of the server or of a proxy in front of it, which may pass. Held and
    /// retried like a 503, never taken as written.
    #[error("FHIR {method} {path}: {message}")]
    Invalid { method: &'static str, path: String, message: String },
    #[error("FHIR authentication failed: {0}")]
    Auth(String),
    /// A request that cannot even be sent (a URL that cannot be built): it never will be.
    #[error("FHIR {method} {path}: the request cannot be sent: {message}")]
    Unsendable { method: &'static str, path: String, message: String },
}

impl FhirError {
    /// Whether the same request may succeed later: the server unreachable or timing out, 408,
    /// 429 and 5xx (but 501: the server will never implement the request).
    pub fn retryable(&self) -> bool {
        match self {
            FhirError::Network { .. } | FhirError::Invalid { .. } => true,
            FhirError::Status { status, .. } => transient_status(*status),
            FhirError::Decode { .. } | FhirError::Auth(_) | FhirError::Unsendable { .. } => false,
        }
    }

    /// The method and what went wrong, without the path (it can hold device or patient
    /// identifiers): fit for logs and readiness.
    pub fn summary(&self) -> String {
        match self {
            FhirError::Network { method, message, .. } => format!("{method}: {message}"),
            FhirError::Status { method, status, .. } => format!("{method}: HTTP {status}"),
            FhirError::Decode { method, .. } => format!("{method}: unexpected response"),
            // The message names the status and content type, never an identifier.
            FhirError::Invalid { method, message, .. } => format!("{method}: {message}"),
            FhirError::Auth(m) => format!("authentication: {m}"),
            FhirError::Unsendable { method, .. } => format!("{method}: the request cannot be sent"),
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
#[derive(Debug, Clone, PartialEq)]
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

/// Statuses worth retrying: 408, 429, and 5xx but 501.
pub fn transient_status(status: u16) -> bool {
    status == 408 || status == 429 || (status >= 500 && status != 501)
}

/// The HTTP status of a batch-response entry (`"201 Created"` → 201; 0 when absent).
pub(crate) fn entry_status(entry: &Value) -> u16 {
    entry
        .pointer("/response/status")
        .and_then(Value::as_str)
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// `W/"3"` → `3`.
pub fn parse_etag(s: &str) -> String {
    s.trim().trim_start_matches("W/").trim_matches('"').to_string()
}

/// `Observation/x/_history/3` (a write's `Location`) → `3`.
pub(crate) fn history_version(location: &str) -> Option<String> {
    let (_, v) = location.rsplit_once("/_history/")?;
    let v = v.trim_end_matches('/');
    (!v.is_empty() && !v.contains('/')).then(|| v.to_string())
}

pub(crate) fn version_of(resource: &Value) -> Option<String> {
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
    use serde_json::json;

    #[test]
    fn etags_and_tokens() {
        assert_eq!(parse_etag("W/\"12\""), "12");
        assert_eq!(history_version("http://h/fhir/Observation/a-1/_history/7").as_deref(), Some("7"));
        assert_eq!(history_version("Observation/a-1"), None);
        assert_eq!(token(Some("urn:x"), "a|b,c"), "urn:x|a\\|b\\,c");
        assert_eq!(encode("urn:x|a b"), "urn%3Ax%7Ca%20b");
    }

    #[test]
    fn outcome_text_reads_diagnostics() {
        let v = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "diagnostics": "status is required"}]});
        assert_eq!(outcome_text(&v), "status is required");
    }
}
