//! What a FHIR answer must be to count: the checks on a successful answer's body, and the order of
//! a resource's history.

use super::{Versioned, version_of};
use serde_json::Value;

/// What a successful answer must be; anything else is `FhirError::Invalid`.
#[derive(Clone, Copy)]
pub(crate) enum Expect<'a> {
    /// A resource of this type (reads, searches and history as `Bundle`, `metadata`).
    Resource(&'a str),
    /// The answer to a write sent with `Prefer: return=minimal`: an empty body, or JSON (the
    /// resource or an OperationOutcome). Never an HTML page or broken JSON.
    Written(&'a str),
    /// A `batch-response` Bundle with exactly this many entries.
    Batch { entries: usize, minimal: bool },
}

impl Expect<'_> {
    /// Writes ask only for the status and the new version (`Prefer: return=minimal`): the writer
    /// never uses the resource echoed back, and the server need not build and send it (an
    /// Observation of a SampledData window is several KB).
    pub(crate) fn minimal(self) -> bool {
        matches!(self, Expect::Written(_) | Expect::Batch { minimal: true, .. })
    }

    /// The body of a 2xx answer, or why it is not what was asked for. The text names the status
    /// and content type only: it is logged and shown by readiness, and must not carry identifiers.
    pub(crate) fn check(self, status: u16, content_type: &str, bytes: &[u8]) -> Result<Value, String> {
        let what = |problem: &str| {
            let ct = content_type.split(';').next().unwrap_or(content_type).trim();
            format!("HTTP {status} ({ct}, {} bytes) {problem}", bytes.len())
        };
        let blank = bytes.iter().all(u8::is_ascii_whitespace);
        if blank {
            return match self {
                Expect::Written(_) => Ok(Value::Null),
                Expect::Resource(t) => Err(what(&format!("with an empty body where a {t} was expected"))),
                Expect::Batch { .. } => Err(what("with an empty body where a batch-response Bundle was expected")),
            };
        }
        let body: Value = serde_json::from_slice(bytes).map_err(|e| what(&format!("that is not JSON ({e})")))?;
        let found = body.get("resourceType").and_then(Value::as_str);
        match self {
            Expect::Written(_) if body.is_object() => Ok(body),
            Expect::Written(t) => Err(what(&format!("that is not a {t} or an OperationOutcome"))),
            Expect::Resource(t) if found == Some(t) => Ok(body),
            Expect::Resource(t) => {
                Err(what(&format!("with resourceType {} where a {t} was expected", found.unwrap_or("none"))))
            }
            Expect::Batch { entries, .. } => {
                if found != Some("Bundle") {
                    return Err(what(&format!(
                        "with resourceType {} where a batch-response Bundle was expected",
                        found.unwrap_or("none")
                    )));
                }
                let got = body.get("entry").and_then(Value::as_array).map_or(0, Vec::len);
                if got != entries {
                    return Err(what(&format!("a batch-response with {got} entries for {entries} sent")));
                }
                Ok(body)
            }
        }
    }
}

/// What a resource's history shows before one of its versions.
#[derive(Debug, Clone, PartialEq)]
pub enum Before {
    /// That version is the first: nothing was overwritten.
    Nothing,
    /// The version written just before it.
    Version(Versioned),
    /// The history does not list that version.
    NotShown,
}

/// The entry just before `version` in a history, never by position: servers list history
/// newest-first, oldest-first, or either. When every version id is a number they are ordered as
/// numbers, and a first version other than "1" means the history is not all there (`NotShown`);
/// otherwise by `meta.lastUpdated`, and a version without a time, or one that shares its time
/// with another, cannot be placed (`NotShown`). Only a history that shows nothing before ours
/// says nothing was overwritten.
pub(crate) fn before(resources: Vec<Value>, version: &str) -> Before {
    let listed: Vec<(String, Value)> = resources.into_iter().filter_map(|r| Some((version_of(&r)?, r))).collect();
    let Some(ours) = listed.iter().find(|(v, _)| v == version) else { return Before::NotShown };
    let found = |(v, r): &(String, Value)| Before::Version(Versioned { version: Some(v.clone()), resource: r.clone() });
    let numbers: Option<Vec<u64>> = listed.iter().map(|(v, _)| v.parse::<u64>().ok()).collect();
    if let (Some(numbers), Ok(mine)) = (numbers, version.parse::<u64>()) {
        let earlier = listed.iter().zip(&numbers).filter(|(_, n)| **n < mine).max_by_key(|(_, n)| **n);
        return match earlier {
            Some((entry, _)) => found(entry),
            None if mine == 1 => Before::Nothing,
            None => Before::NotShown,
        };
    }
    let when = |r: &Value| {
        r.pointer("/meta/lastUpdated")
            .and_then(Value::as_str)
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    };
    let Some(at) = when(&ours.1) else { return Before::NotShown };
    let others: Vec<_> = listed.iter().filter(|(v, _)| v != version).map(|e| (when(&e.1), e)).collect();
    if others.iter().any(|(t, _)| t.is_none() || *t == Some(at)) {
        return Before::NotShown;
    }
    match others.into_iter().filter(|(t, _)| *t < Some(at)).max_by_key(|(t, _)| *t) {
        Some((_, entry)) => found(entry),
        None => Before::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::FhirError;
    use serde_json::json;

    #[test]
    fn a_success_that_is_not_the_fhir_asked_for_is_invalid() {
        let html = b"<html><body>Service moved</body></html>";
        let e = Expect::Written("Observation").check(200, "text/html; charset=utf-8", html).unwrap_err();
        assert!(e.starts_with("HTTP 200 (text/html, 39 bytes) that is not JSON"), "{e}");
        assert_eq!(Expect::Written("Observation").check(201, "none", b"").unwrap(), Value::Null);
        assert!(Expect::Written("Observation").check(200, "application/json", b"{\"resourceType\":").is_err());
        assert!(Expect::Written("Observation").check(200, "application/json", b"[1]").is_err());
        let read = Expect::Resource("Observation");
        assert!(read.check(200, "application/fhir+json", b"").unwrap_err().contains("empty body"));
        let other = br#"{"resourceType":"OperationOutcome"}"#;
        assert!(read.check(200, "application/fhir+json", other).unwrap_err().contains("resourceType OperationOutcome"));
        let obs = br#"{"resourceType":"Observation","id":"a"}"#;
        assert_eq!(read.check(200, "application/fhir+json", obs).unwrap()["id"], "a");
        let batch = Expect::Batch { entries: 2, minimal: true };
        let one = br#"{"resourceType":"Bundle","type":"batch-response","entry":[{}]}"#;
        assert!(batch.check(200, "application/fhir+json", one).unwrap_err().contains("1 entries for 2 sent"));
        let two = br#"{"resourceType":"Bundle","type":"batch-response","entry":[{},{}]}"#;
        assert!(batch.check(200, "application/fhir+json", two).is_ok());
        let invalid = FhirError::Invalid { method: "PUT", path: "Observation/secret".into(), message: e };
        assert!(invalid.retryable(), "held and retried like a 503");
        assert!(!invalid.summary().contains("secret"), "the summary names no identifier");
    }

    fn version(v: &str, at: &str) -> Value {
        json!({"resourceType": "Observation", "meta": {"versionId": v, "lastUpdated": at}})
    }

    #[test]
    fn history_is_ordered_by_version_and_time_never_by_position() {
        let (v1, v2, v3) = (
            version("1", "2026-01-01T00:00:01Z"),
            version("2", "2026-01-01T00:00:02Z"),
            version("10", "2026-01-01T00:00:03Z"),
        );
        let newest_first = vec![v3.clone(), v2.clone(), v1.clone()];
        let oldest_first = vec![v1.clone(), v2.clone(), v3.clone()];
        for listed in [newest_first, oldest_first] {
            let Before::Version(b) = before(listed.clone(), "10") else { panic!("{listed:?}") };
            assert_eq!(b.version.as_deref(), Some("2"), "10 follows 2, not 1 (numbers, not text)");
            assert_eq!(before(listed.clone(), "1"), Before::Nothing, "the first version overwrote nothing");
            assert_eq!(before(listed, "7"), Before::NotShown);
        }
        assert_eq!(before(vec![v1.clone()], "1"), Before::Nothing, "a create answered 200 with only its own version");
        // Version ids that are not numbers: their times order them.
        let (a, b) = (version("b7f", "2026-01-01T00:00:01Z"), version("a01", "2026-01-01T00:00:02+00:00"));
        let Before::Version(got) = before(vec![b.clone(), a.clone()], "a01") else { panic!() };
        assert_eq!(got.version.as_deref(), Some("b7f"));
        assert_eq!(before(vec![a.clone(), b], "b7f"), Before::Nothing);
    }

    #[test]
    fn a_history_that_cannot_show_what_came_before_is_not_taken_for_a_plain_create() {
        // Trimmed or turned-off history: our version 3 with nothing before it listed.
        assert_eq!(before(vec![version("3", "2026-01-01T00:00:03Z")], "3"), Before::NotShown);
        // Two writes of one second, version ids that are not numbers: their order is unknown.
        let (a, b) = (version("x1", "2026-01-01T00:00:01Z"), version("y2", "2026-01-01T00:00:01Z"));
        assert_eq!(before(vec![a.clone(), b], "y2"), Before::NotShown);
        let no_time = json!({"resourceType": "Observation", "meta": {"versionId": "z"}});
        assert_eq!(before(vec![a, no_time.clone()], "z"), Before::NotShown);
        // Numbers and words mixed: ordered by time, never a panic.
        let mixed = vec![version("2", "2026-01-01T00:00:02Z"), version("w", "2026-01-01T00:00:01Z")];
        let Before::Version(got) = before(mixed, "2") else { panic!() };
        assert_eq!(got.version.as_deref(), Some("w"));
    }
}
