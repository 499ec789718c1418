//! Deterministic identifiers: the same input always names the same FHIR resource, so a replayed
//! message updates what it wrote before instead of duplicating it.

use sha2::{Digest, Sha256};

/// The identifier system the reference stamps on Observations and their codes. Kept so that
/// Observations written by MedTech and by this connector are the same resources.
pub const SERVICE_SYSTEM: &str = "https://azure.microsoft.com/en-us/services/iomt-fhir-connector/";

/// Resource id for an identifier: lowercase hex SHA-256 of `{system}_{value}` (system empty when
/// absent), as the reference computes Observation ids and Create-mode Patient/Device ids.
pub fn resource_id(system: Option<&str>, value: &str) -> String {
    let mut h = Sha256::new();
    h.update(system.unwrap_or("").as_bytes());
    h.update(b"_");
    h.update(value.as_bytes());
    hex::encode(h.finalize())
}

/// `{patientResId}.{deviceResId}.{typeName}.{segment}`.
pub fn observation_identifier(patient_id: &str, device_id: &str, type_name: &str, segment: &str) -> String {
    format!("{patient_id}.{device_id}.{type_name}.{segment}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_hashes() {
        assert_eq!(resource_id(None, "patient1"), "cd3ee1fc63936b0083c968fe962a726d383ab6ee83af53d4f50507ccd646b68a");
        assert_eq!(
            resource_id(Some(SERVICE_SYSTEM), "patient.device.typeName.correlationId"),
            "ebc06293d1ca5ac98ff8f1c923acdb6434144fee80c6d6ac05896e12c7bf7cbc"
        );
    }
}
