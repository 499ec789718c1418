//! The IdentityCache actor: which Patient, Device (and Encounter) resources a device's
//! Observations refer to. Lookup, Create and LookupWithEncounter as in the reference; answers are
//! cached (found ones for `cache_ttl_secs`, "not found" for `miss_ttl_secs`); the cache key holds
//! the message's patient id, so a device handed to another patient is noticed.

use crate::config::IdentityMode;
use crate::fhir::{self, FhirError, FhirStore};
use crate::model::ids;
use crate::model::kind::ErrorKind;
use crate::model::observation::Identity;
use crate::status::ActorStats;
use actix::prelude::*;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdentityKey {
    pub device_id: String,
    pub patient_id: Option<String>,
    pub encounter_id: Option<String>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    #[error("no Device has identifier '{0}' (identity mode Lookup: create the Device, or use mode Create)")]
    DeviceNotFound(String),
    #[error("{count} Devices have identifier '{device}'; the identifier must name one Device")]
    Ambiguous { device: String, count: usize },
    #[error("Device/{0} has no patient reference")]
    DeviceWithoutPatient(String),
    #[error("the message's patient id does not match Patient/{patient} of Device/{device}")]
    PatientMismatch { device: String, patient: String },
    #[error("identity mode {mode:?} needs a {what} id in the message: add {what}IdExpression to the device template")]
    NotDefined { mode: IdentityMode, what: &'static str },
    #[error("no Encounter has identifier '{0}'")]
    EncounterNotFound(String),
    #[error("{0}")]
    Fhir(#[from] FhirError),
}

impl IdentityError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            IdentityError::DeviceNotFound(_) => ErrorKind::IdentityNotFound,
            IdentityError::Ambiguous { .. } => ErrorKind::IdentityAmbiguous,
            IdentityError::DeviceWithoutPatient(_) => ErrorKind::IdentityNotFound,
            IdentityError::PatientMismatch { .. } => ErrorKind::PatientMismatch,
            IdentityError::NotDefined { .. } => ErrorKind::IdentityNotDefined,
            IdentityError::EncounterNotFound(_) => ErrorKind::EncounterNotFound,
            IdentityError::Fhir(e) => fhir_kind(e),
        }
    }

    /// Answers worth remembering for a while (a FHIR outage is not).
    fn cacheable(&self) -> bool {
        !matches!(self, IdentityError::Fhir(_))
    }
}

/// The dead-letter kind of a FHIR failure.
pub fn fhir_kind(e: &FhirError) -> ErrorKind {
    match e {
        e if e.retryable() => ErrorKind::FhirUnavailable,
        FhirError::Status { .. } => ErrorKind::FhirRejected,
        FhirError::Decode { .. } | FhirError::Invalid { .. } => ErrorKind::FhirInvalidResponse,
        FhirError::Auth(_) => ErrorKind::FhirAuth,
        FhirError::Network { .. } => ErrorKind::FhirUnavailable,
        FhirError::Unsendable { .. } => ErrorKind::FhirRejected,
    }
}

pub struct Resolve(pub IdentityKey);

impl Message for Resolve {
    type Result = Result<Identity, IdentityError>;
}

pub struct IdentityCache {
    /// The FHIR server, the dry run (with Create mode: the ids Create would make), or a test's
    /// in-memory server.
    store: Arc<dyn FhirStore>,
    mode: IdentityMode,
    device_system: Option<String>,
    ttl: Duration,
    miss_ttl: Duration,
    cache: HashMap<IdentityKey, (Result<Identity, IdentityError>, Instant)>,
    stats: Arc<ActorStats>,
}

impl IdentityCache {
    pub fn new(
        store: Arc<dyn FhirStore>,
        mode: IdentityMode,
        device_system: Option<String>,
        ttl: Duration,
        miss_ttl: Duration,
        stats: Arc<ActorStats>,
    ) -> Self {
        IdentityCache { store, mode, device_system, ttl, miss_ttl, cache: HashMap::new(), stats }
    }
}

impl Actor for IdentityCache {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Forget expired answers now and then so the map does not grow with departed devices.
        ctx.run_interval(Duration::from_secs(60), |act, _| {
            let now = Instant::now();
            act.cache.retain(|_, (_, until)| *until > now);
            act.stats.set_devices(act.cache.len());
        });
    }
}

impl Handler<Resolve> for IdentityCache {
    type Result = ResponseActFuture<Self, Result<Identity, IdentityError>>;

    fn handle(&mut self, Resolve(key): Resolve, _: &mut Context<Self>) -> Self::Result {
        self.stats.received();
        if let Some((answer, until)) = self.cache.get(&key)
            && *until > Instant::now()
        {
            let answer = answer.clone();
            return Box::pin(actix::fut::ready(answer));
        }
        let (store, mode, system) = (self.store.clone(), self.mode, self.device_system.clone());
        let lookup = {
            let key = key.clone();
            async move { resolve(&*store, mode, system.as_deref(), &key).await }
        };
        Box::pin(lookup.into_actor(self).map(move |answer, act, _| {
            let ttl = match &answer {
                Ok(_) => Some(act.ttl),
                Err(e) if e.cacheable() => Some(act.miss_ttl),
                Err(_) => None,
            };
            if let Some(ttl) = ttl {
                act.cache.insert(key, (answer.clone(), Instant::now() + ttl));
                act.stats.set_devices(act.cache.len());
            }
            answer
        }))
    }
}

fn id_of(v: &Value) -> String {
    v.get("id").and_then(Value::as_str).unwrap_or_default().to_string()
}

async fn resolve(
    client: &dyn FhirStore,
    mode: IdentityMode,
    system: Option<&str>,
    key: &IdentityKey,
) -> Result<Identity, IdentityError> {
    let devices = client.search("Device", &[("identifier", &fhir::token(system, &key.device_id))]).await?;
    let (device_id, patient_id) = match devices.as_slice() {
        [] if mode == IdentityMode::Create => return create(client, system, key).await,
        [] => return Err(IdentityError::DeviceNotFound(key.device_id.clone())),
        [device] => {
            let id = id_of(device);
            let patient = device
                .pointer("/patient/reference")
                .and_then(Value::as_str)
                .and_then(|r| r.rsplit('/').next())
                .map(str::to_string)
                .ok_or_else(|| IdentityError::DeviceWithoutPatient(id.clone()))?;
            (id, patient)
        }
        many => return Err(IdentityError::Ambiguous { device: key.device_id.clone(), count: many.len() }),
    };
    if let Some(pid) = &key.patient_id {
        check_patient(client, &device_id, &patient_id, pid).await?;
    }
    let encounter_id = if mode == IdentityMode::LookupWithEncounter {
        let eid = key.encounter_id.as_deref().ok_or(IdentityError::NotDefined { mode, what: "encounter" })?;
        let found = client.search("Encounter", &[("identifier", &fhir::token(None, eid))]).await?;
        match found.as_slice() {
            [e] => Some(id_of(e)),
            [] => return Err(IdentityError::EncounterNotFound(eid.to_string())),
            many => return Err(IdentityError::Ambiguous { device: format!("encounter {eid}"), count: many.len() }),
        }
    } else {
        None
    };
    Ok(Identity { patient_id, device_id, encounter_id })
}

/// The message names a patient: it must be the Device's patient (by resource id, as Create mode
/// derives it, or by one of the Patient's identifiers).
async fn check_patient(
    client: &dyn FhirStore,
    device: &str,
    patient: &str,
    message_patient: &str,
) -> Result<(), IdentityError> {
    if ids::resource_id(None, message_patient) == patient || message_patient == patient {
        return Ok(());
    }
    let mismatch = || IdentityError::PatientMismatch { device: device.to_string(), patient: patient.to_string() };
    let Some(p) = client.read("Patient", patient).await? else { return Err(mismatch()) };
    let ids = p.resource.get("identifier").and_then(Value::as_array).cloned().unwrap_or_default();
    if ids.iter().any(|i| i.get("value").and_then(Value::as_str) == Some(message_patient)) {
        Ok(())
    } else {
        Err(mismatch())
    }
}

/// Create mode: Patient and Device with deterministic ids, written with PUT so that instances
/// racing to create them write the same two resources.
async fn create(client: &dyn FhirStore, system: Option<&str>, key: &IdentityKey) -> Result<Identity, IdentityError> {
    let pid =
        key.patient_id.as_deref().ok_or(IdentityError::NotDefined { mode: IdentityMode::Create, what: "patient" })?;
    let Identity { patient_id, device_id, .. } = Identity::created(system, &key.device_id, pid);
    if client.read("Patient", &patient_id).await?.is_none() {
        let patient = json!({"resourceType": "Patient", "id": patient_id, "identifier": [{"value": pid}]});
        put(client, "Patient", &patient_id, &patient).await?;
    }
    let mut identifier = json!({"value": key.device_id});
    if let Some(s) = system {
        identifier["system"] = json!(s);
    }
    let device = json!({
        "resourceType": "Device",
        "id": device_id,
        "identifier": [identifier],
        "patient": {"reference": format!("Patient/{patient_id}")}
    });
    put(client, "Device", &device_id, &device).await?;
    Ok(Identity { patient_id, device_id, encounter_id: None })
}

async fn put(client: &dyn FhirStore, kind: &'static str, id: &str, resource: &Value) -> Result<(), IdentityError> {
    let r = client.update(kind, id, resource, None).await?;
    if r.status >= 300 {
        return Err(IdentityError::Fhir(FhirError::Status {
            method: "PUT",
            path: format!("{kind}/{id}"),
            status: r.status,
            outcome: r.outcome.unwrap_or_default(),
            retry_after: None,
        }));
    }
    // An answer with no version is no evidence that the server wrote (a proxy's page, a server
    // that says 200 and drops the body): the Observations will point at this resource, so it must
    // be there before they are written.
    if r.version.is_none() && client.read(kind, id).await?.is_none() {
        let e = FhirError::Invalid {
            method: "PUT",
            path: format!("{kind}/{id}"),
            message: format!(
                "HTTP {} with no version, and reading the {kind} back does not find it: the server did not write it",
                r.status
            ),
        };
        client.circuit().trip(e.summary());
        return Err(IdentityError::Fhir(e));
    }
    Ok(())
}

#[cfg(test)]
#[path = "identity_tests.rs"]
mod tests;
