//! The offline transform: a batch of measurements to the Observations the service would write to
//! an empty FHIR server. What `iomt-connector transform` prints.
//!
//! Identity comes from the message (Create mode) or, for Lookup modes, from a small JSON file
//! standing in for the Devices and Encounters the FHIR server holds ([`LookupIdentities`]).

use crate::config::IdentityMode;
use crate::model::group::{GroupError, GroupKey, Grouper};
use crate::model::ids;
use crate::model::kind::ErrorKind;
use crate::model::measurement::Measurement;
use crate::model::observation::{self, Identity, Observation, ObservationError};
use crate::template::fhir::FhirMapping;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use std::collections::HashMap;

/// How a group's Patient, Device (and Encounter) ids are found offline.
pub trait OfflineIdentity {
    fn resolve(&self, key: &GroupKey) -> Result<Identity, TransformError>;
}

/// Create mode: Patient and Device ids derived from the message's ids, as the reference's
/// Create identity service derives them (`sha256("{system}_{value}")`).
#[derive(Debug, Clone, Default)]
pub struct CreateIdentity {
    /// The Device identifier system (ResourceIdentity:DefaultDeviceIdentifierSystem).
    pub device_system: Option<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransformError {
    #[error(transparent)]
    Group(#[from] GroupError),
    #[error(
        "device '{device_id}', type '{type_name}': Create identity needs a patient id; add patientIdExpression to the device template, or use identity mode Lookup"
    )]
    MissingPatient { device_id: String, type_name: String },
    #[error("no Device has identifier '{device_id}' in {file}: add it under \"devices\"")]
    DeviceNotFound { device_id: String, file: String },
    #[error(
        "device '{device_id}': the message's patient id '{message_patient}' is not Patient/{patient} of its Device in {file}: add it to that device's \"patientIdentifiers\" if it is the same patient"
    )]
    PatientMismatch { device_id: String, message_patient: String, patient: String, file: String },
    #[error(
        "device '{device_id}', type '{type_name}': identity mode LookupWithEncounter needs an encounter id; add encounterIdExpression to the device template"
    )]
    MissingEncounter { device_id: String, type_name: String },
    #[error("no Encounter has identifier '{encounter_id}' in {file}: add it under \"encounters\"")]
    EncounterNotFound { encounter_id: String, file: String },
    #[error(transparent)]
    Observation(#[from] ObservationError),
}

impl TransformError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            TransformError::Group(e) => e.kind(),
            TransformError::MissingPatient { .. } | TransformError::MissingEncounter { .. } => {
                ErrorKind::IdentityNotDefined
            }
            TransformError::DeviceNotFound { .. } => ErrorKind::IdentityNotFound,
            TransformError::PatientMismatch { .. } => ErrorKind::PatientMismatch,
            TransformError::EncounterNotFound { .. } => ErrorKind::EncounterNotFound,
            TransformError::Observation(e) => e.kind(),
        }
    }
}

impl OfflineIdentity for CreateIdentity {
    fn resolve(&self, key: &GroupKey) -> Result<Identity, TransformError> {
        let patient = key.patient_id.as_deref().ok_or_else(|| TransformError::MissingPatient {
            device_id: key.device_id.clone(),
            type_name: key.type_name.to_string(),
        })?;
        Ok(Identity::created(self.device_system.as_deref(), &key.device_id, patient))
    }
}

/// Lookup and LookupWithEncounter offline: what the FHIR server would answer, from a file like
///
/// ```json
/// {"devices": {"device123": {"device": "Device/d1", "patient": "Patient/p1"}},
///  "encounters": {"visit-7": "Encounter/e7"}}
/// ```
///
/// keyed by the identifier values the device mapping projects (deviceId, encounterId).
#[derive(Debug, Clone)]
pub struct LookupIdentities {
    mode: IdentityMode,
    file: String,
    table: IdentityTable,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityTable {
    devices: HashMap<String, DeviceEntry>,
    #[serde(default)]
    encounters: HashMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DeviceEntry {
    /// `Device/{id}` or the bare id.
    device: String,
    /// `Patient/{id}` or the bare id: the Device's `patient` reference.
    patient: String,
    /// The Patient's identifier values, which a message's patientId may name instead of its id.
    #[serde(default)]
    patient_identifiers: Vec<String>,
}

/// Why an identities file cannot be used, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("identities file {file}: {message}")]
pub struct IdentitiesError {
    pub file: String,
    pub message: String,
}

fn bare(reference: &str, kind: &str) -> String {
    reference.strip_prefix(kind).and_then(|r| r.strip_prefix('/')).unwrap_or(reference).to_string()
}

impl LookupIdentities {
    /// Reads the file's text; `file` names it in every error. `mode` must be a Lookup mode.
    pub fn parse(mode: IdentityMode, file: &str, text: &str) -> Result<LookupIdentities, IdentitiesError> {
        let err = |message: String| IdentitiesError { file: file.to_string(), message };
        let table: IdentityTable = serde_json::from_str(text).map_err(|e| {
            err(format!(
                "{e}; expected {{\"devices\": {{\"<device id>\": {{\"device\": \"Device/<id>\", \"patient\": \"Patient/<id>\"}}}}, \"encounters\": {{\"<encounter id>\": \"Encounter/<id>\"}}}}"
            ))
        })?;
        if let Some((id, _)) = table.devices.iter().find(|(_, d)| d.device.is_empty() || d.patient.is_empty()) {
            return Err(err(format!("device '{id}' needs both \"device\" and \"patient\"")));
        }
        Ok(LookupIdentities { mode, file: file.to_string(), table })
    }

    fn encounter(&self, key: &GroupKey) -> Result<Option<String>, TransformError> {
        if self.mode != IdentityMode::LookupWithEncounter {
            return Ok(None);
        }
        let eid = key.encounter_id.as_deref().ok_or_else(|| TransformError::MissingEncounter {
            device_id: key.device_id.clone(),
            type_name: key.type_name.to_string(),
        })?;
        match self.table.encounters.get(eid) {
            Some(e) => Ok(Some(bare(e, "Encounter"))),
            None => Err(TransformError::EncounterNotFound { encounter_id: eid.to_string(), file: self.file.clone() }),
        }
    }
}

impl OfflineIdentity for LookupIdentities {
    fn resolve(&self, key: &GroupKey) -> Result<Identity, TransformError> {
        let entry = self.table.devices.get(&key.device_id).ok_or_else(|| TransformError::DeviceNotFound {
            device_id: key.device_id.clone(),
            file: self.file.clone(),
        })?;
        let patient = bare(&entry.patient, "Patient");
        // As the service checks it: the message's patient is the Device's by resource id (as
        // Create mode derives it, or as is) or by one of the Patient's identifiers.
        if let Some(mp) = &key.patient_id
            && *mp != patient
            && ids::resource_id(None, mp) != patient
            && !entry.patient_identifiers.contains(mp)
        {
            return Err(TransformError::PatientMismatch {
                device_id: key.device_id.clone(),
                message_patient: mp.clone(),
                patient,
                file: self.file.clone(),
            });
        }
        let encounter_id = self.encounter(key)?;
        Ok(Identity { patient_id: patient, device_id: bare(&entry.device, "Device"), encounter_id })
    }
}

#[derive(Debug, Default)]
pub struct Batch {
    pub observations: Vec<Observation>,
    pub errors: Vec<TransformError>,
}

/// Groups `measurements` (in ingestion order) and builds one Observation per group, in the order
/// the groups were first seen. A group that fails is reported and the others still build.
pub fn transform(
    fhir: &FhirMapping,
    measurements: Vec<Measurement>,
    identity: &dyn OfflineIdentity,
    issued: DateTime<Utc>,
) -> Batch {
    let mut batch = Batch::default();
    let mut grouper = Grouper::default();
    for m in measurements {
        if let Err(e) = grouper.add(fhir, m) {
            batch.errors.push(e.into());
        }
    }
    for group in grouper.into_groups() {
        let Some(template) = fhir.template(&group.key.type_name) else {
            continue;
        };
        let built = identity
            .resolve(&group.key)
            .and_then(|id| observation::build(template, &group, &id, issued).map_err(Into::into));
        match built {
            Ok(o) => batch.observations.push(o),
            Err(e) => batch.errors.push(e),
        }
    }
    batch
}
