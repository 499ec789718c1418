//! The offline transform: a batch of measurements to the Observations that Create-mode identity
//! would write to an empty FHIR server. What `iomt-connector transform` prints.

use crate::model::group::{GroupError, GroupKey, Grouper};
use crate::model::kind::ErrorKind;
use crate::model::measurement::Measurement;
use crate::model::observation::{self, Identity, Observation, ObservationError};
use crate::template::fhir::FhirMapping;
use chrono::{DateTime, Utc};

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
        "device '{device_id}', type '{type_name}': Create identity needs a patient id; add patientIdExpression to the device template"
    )]
    MissingPatient { device_id: String, type_name: String },
    #[error(transparent)]
    Observation(#[from] ObservationError),
}

impl TransformError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            TransformError::Group(e) => e.kind(),
            TransformError::MissingPatient { .. } => ErrorKind::IdentityNotDefined,
            TransformError::Observation(e) => e.kind(),
        }
    }
}

impl CreateIdentity {
    pub fn resolve(&self, key: &GroupKey) -> Result<Identity, TransformError> {
        let patient = key.patient_id.as_deref().ok_or_else(|| TransformError::MissingPatient {
            device_id: key.device_id.clone(),
            type_name: key.type_name.to_string(),
        })?;
        Ok(Identity::created(self.device_system.as_deref(), &key.device_id, patient))
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
    identity: &CreateIdentity,
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
