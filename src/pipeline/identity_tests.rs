//! The identity cache against the in-memory FHIR server: Create, Lookup, what it caches and what it
//! does not, and the evidence a created resource needs.

use super::super::testkit::identity_cache;
use super::{IdentityError, IdentityKey, Resolve};
use crate::config::IdentityMode;
use crate::fhir::memory::{Call, Fault, MemoryStore, Quirks};
use crate::model::ids::resource_id;
use crate::model::kind::ErrorKind;
use crate::model::observation::Identity;
use serde_json::json;

fn key(device: &str, patient: Option<&str>) -> IdentityKey {
    IdentityKey { device_id: device.into(), patient_id: patient.map(str::to_string), encounter_id: None }
}

fn device(id: &str, identifier: &str, patient: &str) -> serde_json::Value {
    json!({
        "resourceType": "Device",
        "id": id,
        "identifier": [{"system": "urn:test:device", "value": identifier}],
        "patient": {"reference": format!("Patient/{patient}")}
    })
}

#[actix_rt::test]
async fn create_makes_the_patient_and_device_once_and_caches_the_answer() {
    let store = MemoryStore::new();
    let cache = identity_cache(store.clone(), IdentityMode::Create);
    let got = cache.send(Resolve(key("dev-1", Some("pat-1")))).await.unwrap_or_else(|e| panic!("{e}"));
    let want = Identity::created(Some("urn:test:device"), "dev-1", "pat-1");
    assert_eq!(got.unwrap_or_else(|e| panic!("{e}")), want);
    let d = store.get("Device", &want.device_id).unwrap_or_else(|| panic!("no Device"));
    assert_eq!(d["patient"]["reference"], format!("Patient/{}", want.patient_id));
    assert!(store.get("Patient", &resource_id(None, "pat-1")).is_some());
    let asked = store.requests().len();
    let again = cache.send(Resolve(key("dev-1", Some("pat-1")))).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again.unwrap_or_else(|e| panic!("{e}")), want);
    assert_eq!(store.requests().len(), asked, "the second answer came from the cache");
}

#[actix_rt::test]
async fn create_without_a_patient_id_names_the_expression_to_add() {
    let cache = identity_cache(MemoryStore::new(), IdentityMode::Create);
    let err = cache.send(Resolve(key("dev-1", None))).await.unwrap_or_else(|e| panic!("{e}")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::IdentityNotDefined);
    assert!(err.to_string().contains("patientIdExpression"), "{err}");
}

#[actix_rt::test]
async fn lookup_finds_the_device_and_its_patient() {
    let store = MemoryStore::new();
    store.put_resource(device("dv", "dev-1", "pt"));
    let cache = identity_cache(store.clone(), IdentityMode::Lookup);
    let got = cache.send(Resolve(key("dev-1", None))).await.unwrap_or_else(|e| panic!("{e}"));
    let got = got.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((got.device_id.as_str(), got.patient_id.as_str()), ("dv", "pt"));
}

#[actix_rt::test]
async fn lookup_of_an_unknown_device_is_identity_not_found_and_the_miss_is_cached() {
    let store = MemoryStore::new();
    let cache = identity_cache(store.clone(), IdentityMode::Lookup);
    let err = cache.send(Resolve(key("nobody", None))).await.unwrap_or_else(|e| panic!("{e}")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::IdentityNotFound);
    let asked = store.requests().len();
    let _ = cache.send(Resolve(key("nobody", None))).await;
    assert_eq!(store.requests().len(), asked, "a miss is remembered for identity.miss_ttl_secs");
}

#[actix_rt::test]
async fn a_message_for_another_patient_than_the_devices_is_a_mismatch() {
    let store = MemoryStore::new();
    store.put_resource(device("dv", "dev-1", "pt"));
    store.put_resource(json!({"resourceType": "Patient", "id": "pt", "identifier": [{"value": "mrn-1"}]}));
    let cache = identity_cache(store.clone(), IdentityMode::Lookup);
    let ok = cache.send(Resolve(key("dev-1", Some("mrn-1")))).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(ok.is_ok(), "{ok:?}");
    let err = cache.send(Resolve(key("dev-1", Some("mrn-2")))).await.unwrap_or_else(|e| panic!("{e}")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PatientMismatch);
}

#[actix_rt::test]
async fn a_server_that_fails_for_now_is_not_remembered() {
    let store = MemoryStore::new();
    store.fail_next(Call::Search, Fault::Refused, 1);
    let cache = identity_cache(store.clone(), IdentityMode::Create);
    let err = cache.send(Resolve(key("dev-1", Some("pat-1")))).await.unwrap_or_else(|e| panic!("{e}")).unwrap_err();
    assert!(matches!(&err, IdentityError::Fhir(e) if e.retryable()), "{err}");
    let ok = cache.send(Resolve(key("dev-1", Some("pat-1")))).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(ok.is_ok(), "asked again, not served the outage from the cache: {ok:?}");
}

#[actix_rt::test]
async fn a_create_answered_without_a_version_counts_only_when_it_can_be_read_back() {
    let store = MemoryStore::new();
    store.set_quirks(Quirks { no_versions: true, ..Quirks::default() });
    let cache = identity_cache(store.clone(), IdentityMode::Create);
    let ok = cache.send(Resolve(key("dev-1", Some("pat-1")))).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(ok.is_ok(), "{ok:?}");

    let store = MemoryStore::new();
    store.set_quirks(Quirks { drop_writes: true, ..Quirks::default() });
    let cache = identity_cache(store.clone(), IdentityMode::Create);
    let err = cache.send(Resolve(key("dev-1", Some("pat-1")))).await.unwrap_or_else(|e| panic!("{e}")).unwrap_err();
    assert!(matches!(&err, IdentityError::Fhir(e) if e.retryable()), "held, not dead-lettered: {err}");
    assert!(err.to_string().contains("did not write it"), "{err}");
}
