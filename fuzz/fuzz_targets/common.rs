//! What both targets share: the repository's own mappings and messages as fixed inputs, and one
//! pass of a message through everything the service and the command line do with it.

#![allow(dead_code)]

use chrono::{DateTime, TimeZone, Utc};
use iomt_connector::engine::{self, Grouper};
use iomt_connector::model::observation::{self, Outcome};
use iomt_connector::source;
use iomt_connector::template::device::DeviceMapping;
use iomt_connector::template::fhir::FhirMapping;
use iomt_connector::transform::{CreateIdentity, transform};
use serde_json::{Map, Value, json};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub struct Pair {
    pub device: DeviceMapping,
    pub fhir: FhirMapping,
}

pub struct Fixtures {
    /// The sample pair first, then one per conformance vector (in name order): its device
    /// mapping and FHIR mapping where they load, else the sample's. `scripts/fuzz.sh` seeds each
    /// vector's message with its index here.
    pub pairs: Vec<Pair>,
    pub sample_device_text: String,
    pub sample_fhir_text: String,
    /// Sample message bodies: mappings/messages first, then the vectors' inputs.
    pub messages: Vec<Vec<u8>>,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

pub fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let repo = repo();
        let sample_device_text = read(&repo.join("mappings/devicecontent.json")).expect("mappings/devicecontent.json");
        let sample_fhir_text = read(&repo.join("mappings/fhirmapping.json")).expect("mappings/fhirmapping.json");
        let sample_device = || DeviceMapping::parse(&sample_device_text).expect("the sample mapping loads");
        let sample_fhir = || FhirMapping::parse(&sample_fhir_text).expect("the sample FHIR mapping loads");
        let mut pairs = vec![Pair { device: sample_device(), fhir: sample_fhir() }];
        let mut samples: Vec<PathBuf> = std::fs::read_dir(repo.join("mappings/messages"))
            .expect("mappings/messages")
            .flatten()
            .map(|e| e.path())
            .collect();
        samples.sort();
        let mut messages: Vec<Vec<u8>> = samples.iter().filter_map(|p| std::fs::read(p).ok()).collect();
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(repo.join("tests/conformance"))
            .expect("tests/conformance")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        // A fixed order, so that a mapping index in a saved input means the same pair next run.
        dirs.sort();
        for dir in &dirs {
            let device = read(&dir.join("device-template.json")).and_then(|t| DeviceMapping::parse(&t).ok());
            let fhir = read(&dir.join("fhir-template.json")).and_then(|t| FhirMapping::parse(&t).ok());
            pairs.push(Pair { device: device.unwrap_or_else(sample_device), fhir: fhir.unwrap_or_else(sample_fhir) });
            if let Some(input) = read(&dir.join("input.json")) {
                messages.push(input.into_bytes());
            }
        }
        Fixtures { pairs, sample_device_text, sample_fhir_text, messages }
    })
}

/// Runs one input on a thread with the stack the service's threads have (2 MiB, Rust's default
/// for spawned threads: tokio's workers and actix's arbiters), not the main thread's 8 MiB, so that
/// recursion the service could not survive is a crash here too. A panic is passed on as it is.
pub fn on_service_stack(f: impl FnOnce() + Send) {
    std::thread::scope(|s| {
        let worker = std::thread::Builder::new().stack_size(2 << 20).spawn_scoped(s, f).expect("a thread");
        if let Err(panic) = worker.join() {
            std::panic::resume_unwind(panic);
        }
    });
}

/// A fixed clock: `issued` must not make a run depend on when it ran.
pub fn issued() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().unwrap_or_default()
}

/// The IoT Hub system properties an IoT Hub device's message arrives with.
pub fn iothub_properties() -> Map<String, Value> {
    let v = json!({
        "iothub-connection-device-id": "device-1",
        "iothub-creation-time-utc": "2026-01-01T00:00:00Z",
        "iothub-enqueuedtime": "2026-01-01T00:00:01Z"
    });
    v.as_object().cloned().unwrap_or_default()
}

/// The body as the sources read it (`source::body_json`), in the envelope they build.
pub fn delivered(body: &[u8], system: Map<String, Value>) -> Result<Value, String> {
    source::body_json(body, "message").map(|b| source::envelope(b, Map::new(), system))
}

/// Everything done with a message: the debugger's explain, the intake's admit, redrive's
/// would_pass, the offline transform, and a writer's merge of the same group again (a replay).
pub fn exercise(device: &DeviceMapping, fhir: &FhirMapping, event: Result<Value, String>) {
    if let Ok(v) = &event {
        let _ = device.explain(v);
    }
    let _ = engine::would_pass(device, fhir, event.clone());
    let Ok(measurements) = engine::admit(device, event) else {
        return;
    };
    for m in &measurements {
        let _ = serde_json::to_string(m);
    }
    let mut grouper = Grouper::<()>::default();
    for m in measurements.clone() {
        let _ = grouper.add(fhir, m);
    }
    let identity = CreateIdentity::default();
    for group in grouper.into_groups() {
        let (Some(template), Ok(id)) = (fhir.template(&group.key.type_name), identity.resolve(&group.key)) else {
            continue;
        };
        if let Ok(Outcome::Create(obs)) = observation::build_or_merge(template, &group, &id, None, issued()) {
            let _ = serde_json::to_string(&obs);
            let _ = observation::build_or_merge(template, &group, &id, Some(&obs), issued());
        }
    }
    let batch = transform(fhir, measurements, &identity, issued());
    let _ = serde_json::to_string(&batch.observations);
}
