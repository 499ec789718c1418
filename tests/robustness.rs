//! Malformed input never panics: random and mutated messages through normalization (and the FHIR
//! stage behind it) for every sample mapping and every conformance device mapping.

use chrono::Utc;
use iomt_connector::template::device::{DeviceMapping, envelope};
use iomt_connector::template::fhir::FhirMapping;
use iomt_connector::transform::{CreateIdentity, transform};
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

mod common;

struct Fixture {
    mappings: Vec<DeviceMapping>,
    fhir: FhirMapping,
    samples: Vec<Value>,
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let mut mappings = vec![
            DeviceMapping::parse(&read(&repo.join("mappings/devicecontent.json"))).unwrap_or_else(|e| panic!("{e}")),
        ];
        let mut samples = Vec::new();
        for entry in std::fs::read_dir(repo.join("mappings/messages")).into_iter().flatten().flatten() {
            samples.push(serde_json::from_str(&read(&entry.path())).unwrap_or_else(|e| panic!("{e}")));
        }
        // The conformance device mappings cover the IoT Hub, IoT Central and JsonPath kinds.
        let conformance = common::conformance_dir();
        for entry in std::fs::read_dir(&conformance).into_iter().flatten().flatten() {
            let p = entry.path().join("device-template.json");
            if let Ok(m) = DeviceMapping::parse(&std::fs::read_to_string(&p).unwrap_or_default()) {
                mappings.push(m);
            }
            let input = entry.path().join("input.json");
            if let Ok(v) = serde_json::from_str::<Value>(&std::fs::read_to_string(&input).unwrap_or_default()) {
                samples.push(v);
            }
        }
        assert!(mappings.len() > 20 && samples.len() > 20, "conformance folder not found at {}", conformance.display());
        let fhir = FhirMapping::parse(&read(&repo.join("mappings/fhirmapping.json"))).unwrap_or_else(|e| panic!("{e}"));
        Fixture { mappings, fhir, samples }
    })
}

/// Runs a message through every mapping, and what normalizes through the FHIR stage.
fn exercise(event: &Value) {
    let f = fixture();
    for m in &f.mappings {
        for doc in [event.clone(), envelope(event.clone())] {
            if let Ok(ms) = m.normalize(&doc) {
                let _ = transform(&f.fhir, ms, &CreateIdentity::default(), Utc::now());
            }
        }
    }
}

const KEYS: &[&str] = &[
    "heartRate",
    "deviceId",
    "patientId",
    "measurementTime",
    "systolic",
    "diastolic",
    "spo2",
    "steps",
    "bodyTemperature",
    "glucoseMgDl",
    "timestampMs",
    "Body",
    "Properties",
    "SystemProperties",
    "matchedToken",
    "telemetry",
    "HeartRate",
    "enqueuedTime",
    "iothub-connection-device-id",
    "iothub-creation-time-utc",
    "heartrate",
    "date",
    "device",
    "endDate",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        "[ -~]{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("2019-02-01T22:46:01.875Z"),
            Just("9999-12-31T23:59:59.9999999Z"),
            Just("0001-01-01T00:00:00Z"),
            Just("1625677200"),
            Just(" "),
            Just(""),
            Just("-1e308"),
        ]
        .prop_map(|s| Value::String(s.to_string())),
    ]
}

fn arb_json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<Map<_, _>>())
            }),
        ]
    })
}

fn paths(v: &Value, here: &mut Vec<Vec<PathStep>>, at: Vec<PathStep>) {
    here.push(at.clone());
    match v {
        Value::Object(m) => m.iter().for_each(|(k, c)| {
            let mut p = at.clone();
            p.push(PathStep::Key(k.clone()));
            paths(c, here, p)
        }),
        Value::Array(a) => a.iter().enumerate().for_each(|(i, c)| {
            let mut p = at.clone();
            p.push(PathStep::Index(i));
            paths(c, here, p)
        }),
        _ => {}
    }
}

#[derive(Clone, Debug)]
enum PathStep {
    Key(String),
    Index(usize),
}

fn node<'a>(v: &'a mut Value, path: &[PathStep]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, step| match step {
        PathStep::Key(k) => v.get_mut(k.as_str()),
        PathStep::Index(i) => v.get_mut(*i),
    })
}

#[derive(Clone, Debug)]
enum Mutation {
    Replace(Value),
    Delete,
    WrapInArray,
}

fn mutate(mut v: Value, ops: &[(usize, Mutation)]) -> Value {
    for (pick, op) in ops {
        let mut all = Vec::new();
        paths(&v, &mut all, Vec::new());
        let path = all[pick % all.len()].clone();
        match op {
            Mutation::Replace(new) => {
                if let Some(n) = node(&mut v, &path) {
                    *n = new.clone();
                }
            }
            Mutation::WrapInArray => {
                if let Some(n) = node(&mut v, &path) {
                    *n = Value::Array(vec![n.take()]);
                }
            }
            Mutation::Delete => {
                if let Some((last, parent)) = path.split_last() {
                    match (node(&mut v, parent), last) {
                        (Some(Value::Object(m)), PathStep::Key(k)) => {
                            m.remove(k);
                        }
                        (Some(Value::Array(a)), PathStep::Index(i)) if *i < a.len() => {
                            a.remove(*i);
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    v
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => arb_json().prop_map(Mutation::Replace),
        1 => Just(Mutation::Delete),
        1 => Just(Mutation::WrapInArray),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn random_json_never_panics(v in arb_json()) {
        exercise(&v);
    }

    #[test]
    fn mutated_sample_messages_never_panic(
        pick in any::<prop::sample::Index>(),
        ops in prop::collection::vec((any::<usize>(), mutation()), 1..5),
    ) {
        let f = fixture();
        let sample = f.samples[pick.index(f.samples.len())].clone();
        exercise(&mutate(sample, &ops));
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        for m in &fixture().mappings {
            let _ = m.normalize_body(&bytes);
        }
    }
}

/// The fuzz targets' hand-made seeds (fuzz/seeds/load_mapping: nesting thousands deep, huge
/// numbers, a regex filter, slice steps at i64's edge) load or fail with located errors, on a
/// thread with the service's 2 MiB stack. Each deep one overflowed the stack before expressions'
/// nesting was bounded; slice-steps panicked on an overflow.
#[test]
fn fuzz_seed_mappings_load_or_fail_with_located_errors() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/load_mapping");
    let mut seeds: Vec<PathBuf> = std::fs::read_dir(&dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
    seeds.sort();
    assert!(seeds.len() >= 8, "seeds not found in {}", dir.display());
    let sample = read(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("mappings/fhirmapping.json"));
    std::thread::scope(|s| {
        let run = std::thread::Builder::new().stack_size(2 << 20).spawn_scoped(s, || {
            for path in &seeds {
                let text = read(path);
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                let checked = iomt_connector::engine::check(&text, Some(&sample), "fhir.json");
                for event in &fixture().samples {
                    exercise_with(&checked.device, &envelope(event.clone()));
                }
                if name.starts_with("deep-") && name != "deep-json" {
                    let errors = checked.report.device.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n");
                    assert!(errors.contains("more than 64 deep"), "{name}: {errors}");
                    assert!(errors.contains("CalculatedContent 'hr'"), "{name} names its template: {errors}");
                }
                let _ = FhirMapping::parse_partial(&text);
            }
        });
        if let Err(panic) = run.map(|r| r.join()).unwrap_or_else(|e| panic!("a thread: {e}")) {
            std::panic::resume_unwind(panic);
        }
    });
}

fn exercise_with(device: &DeviceMapping, event: &Value) {
    if let Ok(ms) = device.normalize(event) {
        let _ = transform(&fixture().fhir, ms, &CreateIdentity::default(), Utc::now());
    }
}
