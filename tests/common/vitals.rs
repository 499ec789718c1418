//! The vital-signs messages the pipeline tests send (in the sample mappings' format), and what an
//! uninterrupted run makes of them.

#![allow(dead_code)]

use chrono::{DateTime, Duration as Span, Utc};
use iomt_connector::model::ids;
use iomt_connector::template::device::{DeviceMapping, envelope};
use iomt_connector::template::fhir::FhirMapping;
use iomt_connector::transform::{CreateIdentity, transform};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use super::services::Fhir;

pub const BASE: &str = "2026-03-15T10:00:00Z";

pub fn base() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(BASE).map(|t| t.with_timezone(&Utc)).unwrap_or_default()
}

/// One reading of one vital type, in the sample mappings' message format.
#[derive(Clone, Copy, PartialEq)]
pub enum Vital {
    HeartRate,
    Spo2,
    BloodPressure,
    Steps,
}

pub fn hr(d: usize, i: usize) -> usize {
    60 + (d + i) % 40
}
pub fn spo2(d: usize, i: usize) -> usize {
    90 + (d * 7 + i) % 10
}
pub fn sys(d: usize, i: usize) -> usize {
    100 + (d + i) % 40
}
pub fn dia(d: usize, i: usize) -> usize {
    60 + (d + 2 * i) % 20
}
pub fn steps(d: usize, i: usize) -> usize {
    d * 100 + i
}

/// Readings are a second apart; steps (hourly slots in a daily window) an hour apart, one per slot.
pub fn time_of(i: usize, v: Vital) -> DateTime<Utc> {
    match v {
        Vital::Steps => base() + Span::hours(i as i64),
        _ => base() + Span::seconds(i as i64),
    }
}

pub fn message(run: &str, d: usize, i: usize, v: Vital) -> Value {
    let time = time_of(i, v);
    let mut m = json!({
        "deviceId": format!("{run}-dev-{d}"),
        "patientId": format!("{run}-pat-{d}"),
        "measurementTime": time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    match v {
        Vital::HeartRate => m["heartRate"] = json!(hr(d, i)),
        Vital::Spo2 => m["spo2"] = json!(spo2(d, i)),
        Vital::BloodPressure => {
            m["systolic"] = json!(sys(d, i));
            m["diastolic"] = json!(dia(d, i));
        }
        Vital::Steps => m["steps"] = json!(steps(d, i)),
    }
    m
}

pub fn bodies(run: &str, devices: usize, readings: usize, vitals: &[Vital]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for i in 0..readings {
        for d in 0..devices {
            for v in vitals {
                out.push(serde_json::to_vec(&message(run, d, i, *v)).unwrap_or_default());
            }
        }
    }
    out
}

pub fn patient_id(run: &str, d: usize) -> String {
    ids::resource_id(None, &format!("{run}-pat-{d}"))
}

pub fn device_id(system: &str, run: &str, d: usize) -> String {
    ids::resource_id(Some(system), &format!("{run}-dev-{d}"))
}

pub fn loinc(o: &Value) -> &str {
    o["code"]["coding"][0]["code"].as_str().unwrap_or_default()
}

/// SampledData back to readings: slot index → value.
pub fn decode(sd: &Value) -> BTreeMap<usize, String> {
    sd["data"]
        .as_str()
        .unwrap_or_default()
        .split(' ')
        .enumerate()
        .filter(|(_, t)| *t != "E")
        .map(|(i, t)| (i, t.to_string()))
        .collect()
}

/// Strips what legitimately varies between runs (server metadata, processing time, and `status`,
/// which is `amended` once an Observation was merged into).
pub fn content(o: &Value) -> Value {
    let mut o = o.clone();
    if let Some(m) = o.as_object_mut() {
        for k in ["meta", "issued", "status"] {
            m.remove(k);
        }
    }
    o
}

/// What an uninterrupted run writes, by Observation id (the offline transform of the same
/// messages, in order, with Create identity).
pub fn uninterrupted(msgs: &[Vec<u8>], system: &str) -> HashMap<String, Value> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let device =
        DeviceMapping::parse(&std::fs::read_to_string(repo.join("mappings/devicecontent.json")).unwrap_or_default())
            .unwrap_or_default();
    let fhir = FhirMapping::parse(&std::fs::read_to_string(repo.join("mappings/fhirmapping.json")).unwrap_or_default())
        .unwrap_or_default();
    let mut ms = Vec::new();
    for b in msgs {
        ms.extend(device.normalize(&envelope(serde_json::from_slice(b).unwrap_or_default())).unwrap_or_default());
    }
    let batch = transform(&fhir, ms, &CreateIdentity { device_system: Some(system.to_string()) }, Utc::now());
    assert!(batch.errors.is_empty(), "{:?}", batch.errors);
    batch
        .observations
        .iter()
        .map(|o| (o.id.clone().unwrap_or_default(), content(&serde_json::to_value(o).unwrap_or_default())))
        .collect()
}

/// The server's Observations of the run's first `devices` patients equal `want`, one for one.
pub async fn assert_converged(fhir: &Fhir, run: &str, devices: usize, want: &HashMap<String, Value>) {
    let mut got = HashMap::new();
    for d in 0..devices {
        for o in fhir.search(&format!("Observation?subject=Patient/{}", patient_id(run, d))).await {
            got.insert(o["id"].as_str().unwrap_or_default().to_string(), content(&o));
        }
    }
    let missing: Vec<&String> = want.keys().filter(|id| !got.contains_key(*id)).collect();
    assert!(missing.is_empty(), "{} of {} Observations missing, e.g. {:?}", missing.len(), want.len(), missing.first());
    assert_eq!(got.len(), want.len(), "Observation count");
    for (id, w) in want {
        assert_eq!(got.get(id), Some(w), "Observation/{id}");
    }
}
