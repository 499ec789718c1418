//! An in-memory FHIR server for the tests: versioned resources with `If-Match`, history, identifier
//! search and batches, plus the faults and quirks real servers and proxies show (409/412, 5xx with
//! `Retry-After`, a refused connection, an answer that is not FHIR, a create answered 200, history
//! in either order, writes answered without a version or not written at all). It answers the way
//! the real client does after its own retries, so the writers and the identity cache can be tested
//! against it without a network.

use super::answer::before;
use super::{Before, FhirError, FhirStore, Put, PutResult, Versioned, circuit::Circuit, token, transient_status};
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Which requests a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Read,
    Search,
    History,
    Write,
}

/// What the server does instead of answering.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// An HTTP status: 409/412 and other 4xx come back as the write's status, 429/5xx as a
    /// transient error with the `Retry-After` given.
    Status { status: u16, retry_after: Option<Duration> },
    /// Nothing listens.
    Refused,
    /// A 2xx that is not FHIR (an HTML page from a proxy).
    NotFhir,
}

/// How this server differs from the R4 text.
#[derive(Debug, Clone, Copy)]
pub struct Quirks {
    /// The status of a PUT that creates (R4: 201; some servers answer 200).
    pub create_status: u16,
    /// History listed oldest-first on every other read (newest-first otherwise).
    pub history_either_order: bool,
    /// Writes are answered without a version: no etag, no location, no resource.
    pub no_versions: bool,
    /// Writes are answered 2xx without a version and not stored (a proxy's page, a lost body).
    pub drop_writes: bool,
}

impl Default for Quirks {
    fn default() -> Self {
        Quirks { create_status: 201, history_either_order: false, no_versions: false, drop_writes: false }
    }
}

#[derive(Default)]
struct State {
    /// Every version of every resource, oldest first, by `{type}/{id}`.
    versions: HashMap<String, Vec<Value>>,
    /// Due faults: which requests, of which resource type (`None`: any), and what happens.
    faults: VecDeque<(Call, Option<String>, Fault)>,
    quirks: Quirks,
    /// Another writer's version, written just before this server handles the next write to a key.
    sneak: HashMap<String, Value>,
    /// Every request: `PUT Observation/x`, `GET Device?...`.
    requests: Vec<String>,
    history_reads: usize,
    clock: u64,
    /// Searches for an identifier holding this text fail, every one, until it is cleared.
    unsearchable: Option<String>,
}

#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    circuit: Arc<Circuit>,
}

fn key(resource_type: &str, id: &str) -> String {
    format!("{resource_type}/{id}")
}

fn version_id(r: &Value) -> Option<String> {
    r.pointer("/meta/versionId").and_then(Value::as_str).map(str::to_string)
}

impl MemoryStore {
    pub fn new() -> Arc<MemoryStore> {
        Arc::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next `count` requests of `call` meet `fault`, in the order faults were added.
    pub fn fail_next(&self, call: Call, fault: Fault, count: usize) {
        let mut s = self.state();
        for _ in 0..count {
            s.faults.push_back((call, None, fault.clone()));
        }
    }

    /// The same, for requests about one resource type only (a batch is about its first entry's).
    pub fn fail_next_for(&self, call: Call, resource_type: &str, fault: Fault, count: usize) {
        let mut s = self.state();
        for _ in 0..count {
            s.faults.push_back((call, Some(resource_type.to_string()), fault.clone()));
        }
    }

    /// Every search for an identifier holding `needle` fails as unreachable (one device's lookup,
    /// say), until `None` clears it; the other searches go through.
    pub fn unsearchable(&self, needle: Option<&str>) {
        self.state().unsearchable = needle.map(str::to_string);
    }

    pub fn set_quirks(&self, quirks: Quirks) {
        self.state().quirks = quirks;
    }

    /// Stores `resource` as a new version, as another client would.
    pub fn put_resource(&self, resource: Value) -> String {
        let mut s = self.state();
        let (t, id) =
            (resource["resourceType"].as_str().unwrap_or_default(), resource["id"].as_str().unwrap_or_default());
        store(&mut s, &key(t, id), resource.clone())
    }

    /// Before the next write to `{type}/{id}`, another client writes `resource` there (a create race,
    /// or a change between a read and a write).
    pub fn sneak_in_before_next_write(&self, resource: Value) {
        let (t, id) =
            (resource["resourceType"].as_str().unwrap_or_default(), resource["id"].as_str().unwrap_or_default());
        let k = key(t, id);
        self.state().sneak.insert(k, resource);
    }

    /// The current version of a resource.
    pub fn get(&self, resource_type: &str, id: &str) -> Option<Value> {
        self.state().versions.get(&key(resource_type, id)).and_then(|v| v.last().cloned())
    }

    /// How many versions a resource has.
    pub fn version_count(&self, resource_type: &str, id: &str) -> usize {
        self.state().versions.get(&key(resource_type, id)).map_or(0, Vec::len)
    }

    /// Every resource of a type, current versions.
    pub fn all(&self, resource_type: &str) -> Vec<Value> {
        let prefix = format!("{resource_type}/");
        let s = self.state();
        let mut out: Vec<Value> =
            s.versions.iter().filter(|(k, _)| k.starts_with(&prefix)).filter_map(|(_, v)| v.last().cloned()).collect();
        out.sort_by_key(|r| r["id"].as_str().unwrap_or_default().to_string());
        out
    }

    /// Every request so far (`PUT Observation/x`, `GET Observation/x`, `POST batch`, ...).
    pub fn requests(&self) -> Vec<String> {
        self.state().requests.clone()
    }

    /// The fault for this request about `resource_type`, if one is due; as the client would
    /// report it.
    fn fault(&self, call: Call, resource_type: &str, what: String) -> Result<(), FhirError> {
        let mut s = self.state();
        s.requests.push(what);
        let due =
            |(c, t, _): &(Call, Option<String>, Fault)| *c == call && t.as_deref().is_none_or(|t| t == resource_type);
        let Some(i) = s.faults.iter().position(due) else { return Ok(()) };
        let Some((_, _, fault)) = s.faults.remove(i) else { return Ok(()) };
        drop(s);
        let method = if call == Call::Write { "PUT" } else { "GET" };
        let e = match fault {
            Fault::Refused => {
                FhirError::Network { method, path: "(memory)".into(), message: "connection refused".into() }
            }
            Fault::NotFhir => FhirError::Invalid {
                method,
                path: "(memory)".into(),
                message: "HTTP 200 (text/html, 20 bytes) that is not JSON".into(),
            },
            Fault::Status { status, retry_after } => {
                FhirError::Status { method, path: "(memory)".into(), status, outcome: "injected".into(), retry_after }
            }
        };
        if e.retryable() {
            self.circuit.trip(e.summary());
        }
        Err(e)
    }

    fn read_now(&self, resource_type: &str, id: &str) -> Option<Versioned> {
        let r = self.get(resource_type, id)?;
        Some(Versioned { version: version_id(&r), resource: r })
    }

    /// One PUT, after any fault was dealt with.
    fn put(&self, resource_type: &str, id: &str, resource: &Value, if_match: Option<&str>) -> PutResult {
        let mut s = self.state();
        let k = key(resource_type, id);
        if let Some(other) = s.sneak.remove(&k) {
            store(&mut s, &k, other);
        }
        let current = s.versions.get(&k).and_then(|v| v.last()).and_then(version_id);
        if let Some(want) = if_match
            && current.as_deref() != Some(want)
        {
            return PutResult { status: 412, version: None, outcome: Some("version mismatch".into()) };
        }
        let quirks = s.quirks;
        if quirks.drop_writes {
            return PutResult { status: 200, version: None, outcome: None };
        }
        let version = store(&mut s, &k, resource.clone());
        let status = if current.is_none() { quirks.create_status } else { 200 };
        PutResult { status, version: (!quirks.no_versions).then_some(version), outcome: None }
    }

    /// A write fault as the client reports it: a refusal becomes the write's own status.
    fn write_fault(
        &self,
        resource_type: &str,
        what: String,
        entries: usize,
    ) -> Result<Option<Vec<PutResult>>, FhirError> {
        match self.fault(Call::Write, resource_type, what) {
            Ok(()) => Ok(None),
            Err(FhirError::Status { status, outcome, .. }) if !transient_status(status) => Ok(Some(
                (0..entries).map(|_| PutResult { status, version: None, outcome: Some(outcome.clone()) }).collect(),
            )),
            Err(e) => Err(e),
        }
    }
}

/// Stores a new version with its `meta`; returns its version id.
fn store(s: &mut State, k: &str, mut resource: Value) -> String {
    s.clock += 1;
    let versions = s.versions.entry(k.to_string()).or_default();
    let version = (versions.len() + 1).to_string();
    let at = chrono::DateTime::from_timestamp_millis(1_767_225_600_000 + s.clock as i64).unwrap_or_default();
    resource["meta"] = json!({"versionId": version, "lastUpdated": at.to_rfc3339()});
    versions.push(resource);
    version
}

fn matches(resource: &Value, query: &str) -> bool {
    let ids = resource.get("identifier").and_then(Value::as_array).cloned().unwrap_or_default();
    ids.iter().any(|i| {
        let value = i.get("value").and_then(Value::as_str).unwrap_or_default();
        let system = i.get("system").and_then(Value::as_str);
        token(system, value) == query || token(None, value) == query
    })
}

#[async_trait::async_trait]
impl FhirStore for MemoryStore {
    async fn read(&self, resource_type: &str, id: &str) -> Result<Option<Versioned>, FhirError> {
        self.fault(Call::Read, resource_type, format!("GET {}", key(resource_type, id)))?;
        self.circuit.close();
        Ok(self.read_now(resource_type, id))
    }

    async fn read_many(
        &self,
        resource_type: &str,
        ids: &[String],
    ) -> Result<Vec<Result<Option<Versioned>, FhirError>>, FhirError> {
        // As the client: no request for nothing, a plain read for one.
        match ids {
            [] => return Ok(Vec::new()),
            [id] => return Ok(vec![self.read(resource_type, id).await]),
            _ => {}
        }
        self.fault(Call::Read, resource_type, format!("POST batch of {} GET {resource_type}", ids.len()))?;
        self.circuit.close();
        Ok(ids.iter().map(|id| Ok(self.read_now(resource_type, id))).collect())
    }

    async fn history_before(&self, resource_type: &str, id: &str, version: &str) -> Result<Before, FhirError> {
        self.fault(Call::History, resource_type, format!("GET {}/_history", key(resource_type, id)))?;
        self.circuit.close();
        let mut s = self.state();
        s.history_reads += 1;
        let mut listed: Vec<Value> = s.versions.get(&key(resource_type, id)).cloned().unwrap_or_default();
        if !(s.quirks.history_either_order && s.history_reads.is_multiple_of(2)) {
            listed.reverse();
        }
        Ok(before(listed, version))
    }

    async fn search(&self, resource_type: &str, query: &[(&str, &str)]) -> Result<Vec<Value>, FhirError> {
        let q = query.iter().find(|(k, _)| *k == "identifier").map(|(_, v)| *v).unwrap_or_default();
        self.fault(Call::Search, resource_type, format!("GET {resource_type}?identifier"))?;
        if self.state().unsearchable.as_deref().is_some_and(|n| q.contains(n)) {
            let e = FhirError::Network { method: "GET", path: "(memory)".into(), message: "timed out".into() };
            self.circuit.trip(e.summary());
            return Err(e);
        }
        self.circuit.close();
        Ok(self.all(resource_type).into_iter().filter(|r| matches(r, q)).collect())
    }

    async fn update(
        &self,
        resource_type: &str,
        id: &str,
        resource: &Value,
        if_match: Option<&str>,
    ) -> Result<PutResult, FhirError> {
        if let Some(mut r) = self.write_fault(resource_type, format!("PUT {}", key(resource_type, id)), 1)? {
            return Ok(r.remove(0));
        }
        self.circuit.close();
        Ok(self.put(resource_type, id, resource, if_match))
    }

    async fn batch(&self, puts: &[Put]) -> Vec<Result<PutResult, FhirError>> {
        let resource_type = puts.first().map_or("", |p| p.resource_type);
        match self.write_fault(resource_type, format!("POST batch of {} PUT", puts.len()), puts.len()) {
            Ok(Some(r)) => return r.into_iter().map(Ok).collect(),
            Err(e) => return puts.iter().map(|_| Err(e.clone())).collect(),
            Ok(None) => {}
        }
        self.circuit.close();
        puts.iter().map(|p| Ok(self.put(p.resource_type, &p.id, &p.resource, p.if_match.as_deref()))).collect()
    }

    fn circuit(&self) -> &Arc<Circuit> {
        &self.circuit
    }

    fn max_backoff(&self) -> Duration {
        Duration::from_millis(20)
    }
}
