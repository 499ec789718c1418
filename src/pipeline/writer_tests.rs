//! The writer against the in-memory FHIR server: merges, conflicts, create races, what it holds
//! and when it resumes, what it dead-letters, and the evidence it needs before a write counts.

use super::super::testkit::{Kit, blood_pressure, heart_rate};
use crate::fhir::memory::{Call, Fault, MemoryStore, Quirks};
use crate::fhir::{DryRun, FhirStore};
use crate::model::kind::ErrorKind;
use crate::source::Status;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// The readings of an Observation's SampledData, in slot order ("E" slots left out).
fn readings(obs: &Value) -> Vec<String> {
    let data = obs.pointer("/valueSampledData/data").and_then(Value::as_str).unwrap_or_default();
    data.split_whitespace().filter(|v| *v != "E").map(str::to_string).collect()
}

fn the_one(store: &MemoryStore) -> Value {
    let all = store.all("Observation");
    assert_eq!(all.len(), 1, "{all:?}");
    all.into_iter().next().unwrap_or_default()
}

fn persisted(statuses: &std::collections::HashMap<usize, Status>) {
    for (n, s) in statuses {
        assert_eq!(s, &Status::Persisted, "message {n}");
    }
}

fn dead_lettered(status: &Status) -> (ErrorKind, String) {
    match status {
        Status::DeadLettered(f) => (f.kind, f.message.clone()),
        Status::Persisted => panic!("persisted, not dead-lettered"),
    }
}

/// The window's Observation as another writer, on a server of its own, writes `bodies`.
async fn written_elsewhere(bodies: &[Value]) -> Value {
    let elsewhere = MemoryStore::new();
    let mut other = Kit::new(elsewhere.clone());
    let sent = other.write(bodies);
    persisted(&other.settled(&sent).await);
    let mut obs = the_one(&elsewhere);
    if let Some(o) = obs.as_object_mut() {
        o.remove("meta");
    }
    obs
}

fn puts(store: &MemoryStore) -> usize {
    let write =
        |r: &&String| r.starts_with("PUT Observation") || (r.starts_with("POST batch of") && r.ends_with(" PUT"));
    store.requests().iter().filter(write).count()
}

#[actix_rt::test]
async fn a_new_window_is_created_and_its_message_persisted() {
    let store = MemoryStore::new();
    let mut kit = Kit::new(store.clone());
    let sent = kit.write(&[heart_rate("d1", 0, 72), heart_rate("d1", 1, 73)]);
    persisted(&kit.settled(&sent).await);
    let obs = the_one(&store);
    assert_eq!(readings(&obs), ["72", "73"]);
    assert_eq!(obs["status"], "final");
    assert!(store.get("Patient", &crate::model::ids::resource_id(None, "p-d1")).is_some(), "Create made the Patient");
}

#[actix_rt::test]
async fn a_later_message_merges_into_the_window_it_read_once() {
    let store = MemoryStore::new();
    let mut kit = Kit::new(store.clone());
    let first = kit.write(&[heart_rate("d1", 0, 72)]);
    persisted(&kit.settled(&first).await);
    let second = kit.write(&[heart_rate("d1", 5, 80)]);
    persisted(&kit.settled(&second).await);
    let obs = the_one(&store);
    assert_eq!(readings(&obs), ["72", "80"]);
    assert_eq!(obs["status"], "amended");
    let id = obs["id"].as_str().unwrap_or_default();
    assert_eq!(store.version_count("Observation", id), 2);
    let reads = store.requests().iter().filter(|r| r.contains("GET Observation")).count();
    assert_eq!(reads, 1, "the window is read once, then kept: {:?}", store.requests());
}

#[actix_rt::test]
async fn readings_of_one_window_in_one_batch_are_one_write() {
    let store = MemoryStore::new();
    let mut kit = Kit::with(store.clone(), false);
    let sent = kit.write(&[heart_rate("d1", 0, 72), heart_rate("d1", 1, 73), heart_rate("d1", 2, 74)]);
    persisted(&kit.settled(&sent).await);
    assert_eq!(readings(&the_one(&store)), ["72", "73", "74"]);
    assert_eq!(puts(&store), 1, "{:?}", store.requests());
}

#[actix_rt::test]
async fn a_change_between_read_and_write_is_re_read_and_merged() {
    let store = MemoryStore::new();
    let mut kit = Kit::new(store.clone());
    let first = kit.write(&[heart_rate("d1", 0, 72)]);
    persisted(&kit.settled(&first).await);
    // Another writer adds a reading after this writer's read: its If-Match fails (412).
    let id = the_one(&store)["id"].as_str().unwrap_or_default().to_string();
    let theirs = written_elsewhere(&[heart_rate("d1", 0, 72), heart_rate("d1", 9, 99)]).await;
    store.sneak_in_before_next_write(theirs);
    let second = kit.write(&[heart_rate("d1", 5, 80)]);
    persisted(&kit.settled(&second).await);
    assert_eq!(readings(&the_one(&store)), ["72", "80", "99"], "both writers' readings");
    assert_eq!(store.version_count("Observation", &id), 3);
}

#[actix_rt::test]
async fn a_window_that_keeps_changing_is_dead_lettered_as_a_conflict() {
    let store = MemoryStore::new();
    let mut kit = Kit::new(store.clone());
    store.fail_next_for(Call::Write, "Observation", Fault::Status { status: 412, retry_after: None }, 4);
    let sent = kit.write(&[heart_rate("d1", 0, 72)]);
    let got = kit.settled(&sent).await;
    let (kind, text) = dead_lettered(&got[&sent[0]]);
    assert_eq!(kind, ErrorKind::FhirConflict);
    assert!(text.contains("kept changing"), "{text}");
}

#[actix_rt::test]
async fn a_create_race_merges_the_overwritten_version_back() {
    let store = MemoryStore::new();
    let racer = written_elsewhere(&[heart_rate("d1", 3, 90)]).await;
    // It lands between this writer's read (nothing there) and its create (no If-Match).
    store.sneak_in_before_next_write(racer);
    let mut kit = Kit::new(store.clone());
    let sent = kit.write(&[heart_rate("d1", 0, 72)]);
    persisted(&kit.settled(&sent).await);
    let obs = the_one(&store);
    assert_eq!(readings(&obs), ["72", "90"], "the overwritten reading is merged back");
    assert!(store.requests().iter().any(|r| r.ends_with("/_history")), "{:?}", store.requests());
}

#[actix_rt::test]
async fn a_create_answered_200_whose_history_starts_with_it_is_a_plain_create_in_either_order() {
    let store = MemoryStore::new();
    store.set_quirks(Quirks { create_status: 200, history_either_order: true, ..Quirks::default() });
    let mut kit = Kit::new(store.clone());
    for d in ["d1", "d2", "d3"] {
        let sent = kit.write(&[blood_pressure(d, 0, 120), blood_pressure(d, 1, 121)]);
        persisted(&kit.settled(&sent).await);
    }
    let all = store.all("Observation");
    assert_eq!(all.len(), 6);
    for obs in &all {
        let id = obs["id"].as_str().unwrap_or_default();
        assert_eq!(store.version_count("Observation", id), 1, "nothing written twice");
    }
    let histories = store.requests().iter().filter(|r| r.ends_with("/_history")).count();
    assert_eq!(histories, 6, "each create answered 200 looked at its history");
}

#[actix_rt::test]
async fn a_503_with_retry_after_holds_the_messages_until_the_server_takes_them() {
    let store = MemoryStore::new();
    let mut kit = Kit::new(store.clone());
    store.fail_next_for(
        Call::Write,
        "Observation",
        Fault::Status { status: 503, retry_after: Some(Duration::from_secs(1)) },
        3,
    );
    let sent = kit.write(&[heart_rate("d1", 0, 72), heart_rate("d2", 0, 60)]);
    persisted(&kit.settled(&sent).await);
    assert_eq!(store.all("Observation").len(), 2);
    assert_eq!(puts(&store), 4, "three refused, then written: {:?}", store.requests());
}

#[actix_rt::test]
async fn a_refused_connection_holds_and_resumes_when_the_server_is_back() {
    let store = MemoryStore::new();
    let mut kit = Kit::new(store.clone());
    store.fail_next(Call::Search, Fault::Refused, 2);
    store.fail_next(Call::Read, Fault::Refused, 2);
    let sent = kit.write(&[heart_rate("d1", 0, 72)]);
    persisted(&kit.settled(&sent).await);
    assert_eq!(readings(&the_one(&store)), ["72"]);
    assert!(!store.circuit().is_open(), "the circuit closed when the server answered");
}

#[actix_rt::test]
async fn a_refusal_is_dead_lettered_with_its_status_and_the_rest_is_written() {
    let store = MemoryStore::new();
    let mut kit = Kit::with(store.clone(), false);
    store.fail_next_for(Call::Write, "Observation", Fault::Status { status: 422, retry_after: None }, 1);
    let sent = kit.write(&[heart_rate("d1", 0, 72)]);
    let got = kit.settled(&sent).await;
    let (kind, text) = dead_lettered(&got[&sent[0]]);
    assert_eq!(kind, ErrorKind::FhirRejected);
    assert!(text.contains("HTTP 422"), "{text}");
    let next = kit.write(&[heart_rate("d2", 0, 60)]);
    persisted(&kit.settled(&next).await);
}

#[actix_rt::test]
async fn a_write_answered_without_a_version_is_read_back_and_counts() {
    let store = MemoryStore::new();
    store.set_quirks(Quirks { no_versions: true, ..Quirks::default() });
    let mut kit = Kit::new(store.clone());
    let sent = kit.write(&[heart_rate("d1", 0, 72), blood_pressure("d1", 0, 120)]);
    persisted(&kit.settled(&sent).await);
    assert_eq!(store.all("Observation").len(), 2);
    let requests = store.requests();
    let write =
        requests.iter().position(|r| r.starts_with("POST batch of 2 PUT")).unwrap_or_else(|| panic!("{requests:?}"));
    assert!(requests[write..].iter().any(|r| r.contains("GET Observation")), "read back: {requests:?}");
    // The version read back makes the next write conditional, and it merges.
    let more = kit.write(&[heart_rate("d1", 1, 73)]);
    persisted(&kit.settled(&more).await);
    let hr = store.all("Observation").into_iter().find(|o| o.get("valueSampledData").is_some()).unwrap_or_default();
    assert_eq!(readings(&hr), ["72", "73"]);
}

#[actix_rt::test]
async fn a_write_the_server_answered_but_did_not_keep_is_held_and_written_again() {
    let store = MemoryStore::new();
    let mut kit = Kit::new(store.clone());
    let first = kit.write(&[heart_rate("d1", 0, 72)]);
    persisted(&kit.settled(&first).await);
    store.set_quirks(Quirks { drop_writes: true, ..Quirks::default() });
    let sent = kit.write(&[heart_rate("d1", 1, 73)]);
    kit.nothing_settled_for(Duration::from_millis(300)).await;
    assert_eq!(readings(&the_one(&store)), ["72"], "the server still holds only the first reading");
    assert!(store.circuit().is_open(), "readiness shows it");
    store.set_quirks(Quirks::default());
    persisted(&kit.settled(&sent).await);
    assert_eq!(readings(&the_one(&store)), ["72", "73"]);
}

#[actix_rt::test]
async fn answers_that_are_not_fhir_hold_and_never_dead_letter() {
    let store = MemoryStore::new();
    let mut kit = Kit::new(store.clone());
    store.fail_next(Call::Write, Fault::NotFhir, 3);
    store.fail_next_for(Call::Read, "Observation", Fault::NotFhir, 2);
    let sent = kit.write(&[heart_rate("d1", 0, 72), heart_rate("d2", 0, 61)]);
    persisted(&kit.settled(&sent).await);
    assert_eq!(store.all("Observation").len(), 2);
}

#[actix_rt::test]
async fn the_dry_run_takes_every_write_and_keeps_merging() {
    let mut kit = Kit::new(Arc::new(DryRun::default()));
    let first = kit.write(&[heart_rate("d1", 0, 72), blood_pressure("d1", 0, 120)]);
    persisted(&kit.settled(&first).await);
    let second = kit.write(&[heart_rate("d1", 1, 73)]);
    persisted(&kit.settled(&second).await);
}

#[actix_rt::test]
async fn a_create_answered_200_without_a_version_still_merges_what_it_overwrote() {
    let store = MemoryStore::new();
    store.set_quirks(Quirks { create_status: 200, no_versions: true, ..Quirks::default() });
    let racer = written_elsewhere(&[heart_rate("d1", 3, 90)]).await;
    store.sneak_in_before_next_write(racer);
    let mut kit = Kit::new(store.clone());
    let sent = kit.write(&[heart_rate("d1", 0, 72)]);
    persisted(&kit.settled(&sent).await);
    assert_eq!(readings(&the_one(&store)), ["72", "90"], "the overwritten reading is merged back");
    assert!(store.requests().iter().any(|r| r.ends_with("/_history")), "{:?}", store.requests());
}

#[actix_rt::test]
async fn one_failed_bundle_does_not_void_what_the_others_answered() {
    let store = MemoryStore::new();
    let mut kit = Kit::new(store.clone());
    let first = kit.write(&[heart_rate("d1", 0, 72), heart_rate("d2", 0, 60)]);
    persisted(&kit.settled(&first).await);
    store.fail_next_for(Call::Write, "Observation", Fault::Refused, 1);
    let second = kit.write(&[heart_rate("d1", 1, 73), heart_rate("d2", 1, 61)]);
    persisted(&kit.settled(&second).await);
    let all = store.all("Observation");
    let mut got: Vec<Vec<String>> = all.iter().map(readings).collect();
    got.sort();
    assert_eq!(got, [vec!["60", "61"], vec!["72", "73"]]);
}

#[actix_rt::test]
async fn a_device_that_cannot_be_resolved_waits_without_stopping_the_others() {
    let store = MemoryStore::new();
    store.unsearchable(Some("stuck"));
    let mut kit = Kit::new(store.clone());
    let sent = kit.write(&[heart_rate("stuck", 0, 72), heart_rate("d1", 0, 60), heart_rate("d2", 0, 61)]);
    let got = kit.settled(&sent[1..]).await;
    assert!(!got.contains_key(&sent[0]), "the stuck device's message is held, not settled: {got:?}");
    persisted(&got);
    // Later rounds go ahead while the stuck device is held; its own later message waits behind it.
    let stuck_later = kit.write(&[heart_rate("stuck", 1, 73)]);
    let others_later = kit.write(&[heart_rate("d1", 1, 62)]);
    let got = kit.settled(&others_later).await;
    assert!(!got.contains_key(&sent[0]) && !got.contains_key(&stuck_later[0]), "{got:?}");
    persisted(&got);
    kit.nothing_settled_for(Duration::from_millis(800)).await;
    store.unsearchable(None);
    persisted(&kit.settled(&[sent[0], stuck_later[0]]).await);
    let stuck = store
        .all("Observation")
        .into_iter()
        .find(|o| o["subject"]["reference"] == format!("Patient/{}", crate::model::ids::resource_id(None, "p-stuck")))
        .unwrap_or_else(|| panic!("the stuck device's Observation: {:?}", store.all("Observation")));
    assert_eq!(readings(&stuck), ["72", "73"]);
    assert_eq!(store.all("Observation").len(), 3);
}
