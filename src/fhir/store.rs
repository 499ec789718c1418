//! The FHIR store seam: what the writers and the identity cache ask of a FHIR server. Three stores
//! answer it: the real client (`FhirClient`, in `client.rs`), the dry run ([`DryRun`]: everything is taken,
//! nothing is kept), and an in-memory server with injected faults for the tests
//! ([`super::memory::MemoryStore`]).

use super::{Before, FhirError, Put, PutResult, Versioned, circuit::Circuit};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// A FHIR server as the pipeline uses it. Errors follow the client's rules: `retryable()` ones are
/// held and retried, the rest fail their groups with a dead-letter kind.
#[async_trait::async_trait]
pub trait FhirStore: Send + Sync {
    /// `GET {type}/{id}`; `None` when the server has no such resource.
    async fn read(&self, resource_type: &str, id: &str) -> Result<Option<Versioned>, FhirError>;

    /// Several reads; one answer per id, in order.
    async fn read_many(
        &self,
        resource_type: &str,
        ids: &[String],
    ) -> Result<Vec<Result<Option<Versioned>, FhirError>>, FhirError>;

    /// What the history of `{type}/{id}` holds before `version`.
    async fn history_before(&self, resource_type: &str, id: &str, version: &str) -> Result<Before, FhirError>;

    /// `GET {type}?{query}`: the matching resources of the first page.
    async fn search(&self, resource_type: &str, query: &[(&str, &str)]) -> Result<Vec<Value>, FhirError>;

    /// `PUT {type}/{id}`, conditional on `if_match` when given. A refusal that retrying cannot fix
    /// (4xx but 408/429) is an `Ok` with its status; `version: None` on a 2xx means the answer
    /// gave no evidence of a version.
    async fn update(
        &self,
        resource_type: &str,
        id: &str,
        resource: &Value,
        if_match: Option<&str>,
    ) -> Result<PutResult, FhirError>;

    /// Several PUTs; one result per entry, in order (an entry that could not be sent has its own
    /// error: the others' answers still count).
    async fn batch(&self, puts: &[Put]) -> Vec<Result<PutResult, FhirError>>;

    /// Open while the server fails transiently; held writers wait on it.
    fn circuit(&self) -> &Arc<Circuit>;

    /// The longest pause between retries.
    fn max_backoff(&self) -> Duration;
}

/// The dry run (`run --dry-run`): nothing is on the server, every write is taken and forgotten.
/// The writers still build, merge and count every Observation (they keep what they wrote, as they
/// do against a server); the identity cache runs in Create mode, so ids are what Create would make.
#[derive(Default)]
pub struct DryRun {
    circuit: Arc<Circuit>,
}

/// The version every dry-run write gets: the writers need one to treat the write as done.
const DRY_VERSION: &str = "1";

fn taken() -> PutResult {
    PutResult { status: 201, version: Some(DRY_VERSION.into()), outcome: None }
}

#[async_trait::async_trait]
impl FhirStore for DryRun {
    async fn read(&self, _: &str, _: &str) -> Result<Option<Versioned>, FhirError> {
        Ok(None)
    }

    async fn read_many(&self, _: &str, ids: &[String]) -> Result<Vec<Result<Option<Versioned>, FhirError>>, FhirError> {
        Ok(ids.iter().map(|_| Ok(None)).collect())
    }

    async fn history_before(&self, _: &str, _: &str, _: &str) -> Result<Before, FhirError> {
        Ok(Before::Nothing)
    }

    async fn search(&self, _: &str, _: &[(&str, &str)]) -> Result<Vec<Value>, FhirError> {
        Ok(Vec::new())
    }

    async fn update(&self, _: &str, _: &str, _: &Value, _: Option<&str>) -> Result<PutResult, FhirError> {
        Ok(taken())
    }

    async fn batch(&self, puts: &[Put]) -> Vec<Result<PutResult, FhirError>> {
        puts.iter().map(|_| Ok(taken())).collect()
    }

    fn circuit(&self) -> &Arc<Circuit> {
        &self.circuit
    }

    fn max_backoff(&self) -> Duration {
        Duration::from_millis(100)
    }
}
