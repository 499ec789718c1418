//! The engine: the rules every front end shares, so the running service and the offline tools
//! (`validate`, `normalize`, `transform`, `studio`, `dead-letters redrive`) cannot drift apart.
//!
//! * [`check`]: read both mappings, every problem with its place, and cross-check them;
//! * [`admit`]: an envelope into measurements, or the typed failure it is dead-lettered with;
//! * [`Grouper`] (re-exported): measurements into their (device, type, window) groups;
//! * [`Identity::created`] (re-exported): Create mode's Patient and Device ids.

use crate::model::kind::{ErrorKind, Failure};
use crate::model::measurement::Measurement;
use crate::template::TemplateError;
use crate::template::crosscheck::cross_check;
use crate::template::device::DeviceMapping;
use crate::template::fhir::FhirMapping;
use serde_json::Value;
use sha2::{Digest, Sha256};

pub use crate::model::group::Grouper;
pub use crate::model::observation::Identity;

/// What to do with a message no device template matches (`pipeline.unmatched`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unmatched {
    /// Ack it, counted in `iomt_messages_dropped_total{reason="no-match"}`.
    Drop,
    /// Dead-letter it as `no-template-matched`.
    DeadLetter,
}

/// Both mappings as far as they parse, and what is wrong with them.
pub struct Checked {
    pub device: DeviceMapping,
    /// `None` when no FHIR mapping was given.
    pub fhir: Option<FhirMapping>,
    pub report: Report,
}

/// Every problem found, by where it is.
#[derive(Debug, Default)]
pub struct Report {
    pub device: Vec<TemplateError>,
    pub fhir: Vec<TemplateError>,
    /// Cross-check problems, at their place in the device mapping (only when the FHIR mapping
    /// parses: they mean nothing otherwise).
    pub cross: Vec<TemplateError>,
    /// Worth knowing but not wrong, at their place in the FHIR mapping.
    pub notes: Vec<TemplateError>,
}

impl Report {
    /// Problems that stop a mapping from loading (cross-check problems do not: MedTech runs such
    /// pairs, and their messages are dead-lettered).
    pub fn refuses(&self) -> bool {
        !self.device.is_empty() || !self.fhir.is_empty()
    }

    pub fn problem_count(&self) -> usize {
        self.device.len() + self.fhir.len() + self.cross.len()
    }
}

/// Parses the device mapping and, when given, the FHIR mapping; `fhir_file` names the FHIR
/// mapping in cross-check messages.
pub fn check(device_text: &str, fhir_text: Option<&str>, fhir_file: &str) -> Checked {
    let (device, device_errors) = DeviceMapping::parse_partial(device_text);
    let mut report = Report { device: device_errors, ..Report::default() };
    let fhir = fhir_text.map(|text| {
        let (fhir, errors) = FhirMapping::parse_partial(text);
        if errors.is_empty() {
            let checked = cross_check(&device, &fhir, fhir_file);
            report.cross = checked.problems;
            report.notes = checked.notes;
        }
        report.fhir = errors;
        fhir
    });
    Checked { device, fhir, report }
}

/// The version of a pair of mapping texts: the first 12 hex digits of the sha256 of both.
pub fn version(device_text: &str, fhir_text: &str) -> String {
    let mut h = Sha256::new();
    h.update(device_text.as_bytes());
    h.update([0]);
    h.update(fhir_text.as_bytes());
    hex::encode(h.finalize())[..12].to_string()
}

/// A message, as its source read it (`Err`: its body is not JSON, and why), into the measurements
/// the device mapping projects out of it. A message no template matches is `NoTemplateMatched`:
/// the caller decides whether that is dropped (`pipeline.unmatched`) or dead-lettered.
pub fn admit(device: &DeviceMapping, event: Result<Value, String>) -> Result<Vec<Measurement>, Failure> {
    let event = event.map_err(|why| Failure::new(ErrorKind::InvalidJson, why))?;
    let measurements = device.normalize(&event).map_err(|e| Failure::new(e.kind(), e.to_string()))?;
    if measurements.is_empty() {
        return Err(Failure::new(
            ErrorKind::NoTemplateMatched,
            "no device template's typeMatchExpression matched the message",
        ));
    }
    for m in &measurements {
        check_identifiers(m)?;
    }
    Ok(measurements)
}

/// The longest device, patient, encounter or correlation id taken, in bytes. Identifiers go into
/// search URLs and Observation identifiers; a longer one (a poison message) could never be looked
/// up or written, and retrying it would hold its writer's other devices.
pub const MAX_IDENTIFIER_BYTES: usize = 1024;

fn check_identifiers(m: &Measurement) -> Result<(), Failure> {
    let ids = [
        ("deviceIdExpression", Some(&m.device_id)),
        ("patientIdExpression", m.patient_id.as_ref()),
        ("encounterIdExpression", m.encounter_id.as_ref()),
        ("correlationIdExpression", m.correlation_id.as_ref()),
    ];
    for (field, id) in ids {
        if let Some(id) = id.filter(|id| id.len() > MAX_IDENTIFIER_BYTES) {
            return Err(Failure::new(
                ErrorKind::IdentifierTooLong,
                format!(
                    "template '{}': the value of {field} is {} bytes long; identifiers may be at most {MAX_IDENTIFIER_BYTES} bytes",
                    m.type_name,
                    id.len()
                ),
            ));
        }
    }
    Ok(())
}

/// What the service would do with a message now, short of writing it: admitted and grouped with
/// `fhir` (every measurement has its FHIR template and window). What `dead-letters redrive` asks.
pub fn would_pass(device: &DeviceMapping, fhir: &FhirMapping, event: Result<Value, String>) -> Result<(), Failure> {
    let mut grouper = Grouper::<()>::default();
    for m in admit(device, event)? {
        grouper.add(fhir, m).map_err(|e| Failure::new(e.kind(), e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::device::envelope;
    use serde_json::json;

    fn sample(f: &str) -> String {
        let path = format!("{}/mappings/{f}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn the_sample_pair_checks_clean_and_a_missing_fhir_template_is_a_cross_problem() {
        let (device, fhir) = (sample("devicecontent.json"), sample("fhirmapping.json"));
        let checked = check(&device, Some(&fhir), "fhir.json");
        assert_eq!(checked.report.problem_count(), 0, "{:?}", checked.report);
        let empty = r#"{"templateType": "CollectionFhir", "template": []}"#;
        let checked = check(&device, Some(empty), "fhir.json");
        assert!(!checked.report.refuses(), "a cross-check problem does not refuse the pair");
        assert!(!checked.report.cross.is_empty());
        assert!(checked.report.cross[0].message.contains("fhir.json"), "{:?}", checked.report.cross[0]);
        let broken = check("{", None, "fhir.json");
        assert!(broken.report.refuses() && broken.fhir.is_none());
    }

    #[test]
    fn admit_types_every_way_a_message_fails() {
        let device = DeviceMapping::parse(&sample("devicecontent.json")).unwrap_or_else(|e| panic!("{e}"));
        let kind = |r: Result<Vec<Measurement>, Failure>| r.err().map(|f| f.kind);
        assert_eq!(kind(admit(&device, Err("line 1".into()))), Some(ErrorKind::InvalidJson));
        assert_eq!(kind(admit(&device, Ok(envelope(json!({"nothing": 1}))))), Some(ErrorKind::NoTemplateMatched));
        let no_time = json!({"deviceId": "d", "patientId": "p", "heartRate": 70});
        assert_eq!(kind(admit(&device, Ok(envelope(no_time)))), Some(ErrorKind::MissingValue));
        let ok = json!({"deviceId": "d", "patientId": "p", "measurementTime": "2026-01-01T00:00:00Z", "heartRate": 70});
        assert_eq!(admit(&device, Ok(envelope(ok))).map(|m| m.len()), Ok(1));
        let poison = "d".repeat(70_000);
        let long =
            json!({"deviceId": poison, "patientId": "p", "measurementTime": "2026-01-01T00:00:00Z", "heartRate": 70});
        let f = admit(&device, Ok(envelope(long))).unwrap_err();
        assert_eq!(f.kind, ErrorKind::IdentifierTooLong);
        assert!(f.message.contains("deviceIdExpression") && f.message.contains("1024"), "{}", f.message);
    }

    #[test]
    fn would_pass_needs_a_fhir_template_for_every_measurement() {
        let device = DeviceMapping::parse(&sample("devicecontent.json")).unwrap_or_else(|e| panic!("{e}"));
        let fhir = FhirMapping::parse(r#"{"templateType": "CollectionFhir", "template": []}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        let ok = json!({"deviceId": "d", "patientId": "p", "measurementTime": "2026-01-01T00:00:00Z", "heartRate": 70});
        let failure = would_pass(&device, &fhir, Ok(envelope(ok))).unwrap_err();
        assert_eq!(failure.kind, ErrorKind::NoFhirTemplate);
        assert!(failure.message.contains("heartrate"), "{}", failure.message);
    }
}
