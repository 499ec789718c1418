//! Normalization throughput, single thread, beside the floor: `serde_json::from_slice` of the same
//! message alone. `cargo bench --bench normalize`; each line's thrpt is messages per second.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use iomt_connector::template::device::DeviceMapping;
use std::hint::black_box;

/// The MedTech docs' heart-rate CalculatedContent template.
const HEART_RATE: &str = r#"{"templateType": "CollectionContent", "template": [{"templateType": "CalculatedContent", "template": {
  "typeName": "heartrate", "typeMatchExpression": "$..[?(@heartRate)]",
  "deviceIdExpression": "$.matchedToken.deviceId", "timestampExpression": "$.matchedToken.endDate",
  "values": [{"required": true, "valueExpression": "$.matchedToken.heartRate", "valueName": "hr"}]}}]}"#;

/// The same projection written in JMESPath, with an epoch-millisecond timestamp.
const JMESPATH: &str = r#"{"templateType": "CollectionContent", "template": [{"templateType": "CalculatedContent", "template": {
  "defaultExpressionLanguage": "JmesPath",
  "typeName": "heartrate", "typeMatchExpression": "to_array(Body)[?heartRate]",
  "deviceIdExpression": "matchedToken.deviceId", "timestampExpression": "fromUnixTimestampMs(matchedToken.ts)",
  "values": [{"required": true, "valueExpression": "matchedToken.heartRate", "valueName": "hr"}]}}]}"#;

fn envelope(body: &str) -> Vec<u8> {
    format!(r#"{{"Body": {body}, "Properties": {{}}, "SystemProperties": {{}}}}"#).into_bytes()
}

fn reading(i: usize) -> String {
    format!(
        r#"{{"heartRate": "{}", "endDate": "2019-02-01T22:46:{:02}.8750000Z", "deviceId": "device123"}}"#,
        60 + i,
        i
    )
}

fn cases() -> Vec<(&'static str, &'static str, Vec<u8>, usize)> {
    let ten: Vec<String> = (0..10).map(reading).collect();
    vec![
        ("heart-rate CalculatedContent", HEART_RATE, envelope(&reading(1)), 1),
        (
            "JMESPath template",
            JMESPATH,
            envelope(r#"{"heartRate": 78, "ts": 1626799080000, "deviceId": "device123"}"#),
            1,
        ),
        ("10-reading array", HEART_RATE, envelope(&format!("[{}]", ten.join(","))), 10),
    ]
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("normalize");
    g.throughput(Throughput::Elements(1));
    for (name, mapping, msg, expected) in cases() {
        let mapping = DeviceMapping::parse(mapping).unwrap_or_else(|e| panic!("{e}"));
        let n = mapping.normalize_event_bytes(&msg).map(|m| m.len());
        assert_eq!(n, Ok(expected), "{name}");
        g.bench_with_input(BenchmarkId::new("serde_json::from_slice (floor)", name), &msg, |b, msg| {
            b.iter(|| serde_json::from_slice::<serde_json::Value>(black_box(msg)))
        });
        g.bench_with_input(BenchmarkId::new("parse + normalize", name), &msg, |b, msg| {
            b.iter(|| mapping.normalize_event_bytes(black_box(msg)))
        });
    }
    g.finish();
}

/// The summary for the README: parse and parse+normalize measured in alternating rounds, so drift
/// in a shared machine's speed hits both alike; medians of per-message time.
fn summary() {
    const ROUNDS: usize = 41;
    let time = |f: &mut dyn FnMut()| {
        let iters = 2_000;
        let t = std::time::Instant::now();
        for _ in 0..iters {
            f();
        }
        t.elapsed().as_nanos() as f64 / iters as f64
    };
    println!("\n| message | serde_json::from_slice (floor) | parse + normalize | ratio |");
    println!("|---|---|---|---|");
    for (name, mapping, msg, _) in cases() {
        let mapping = DeviceMapping::parse(mapping).unwrap_or_else(|e| panic!("{e}"));
        let (mut floor, mut full) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            floor.push(time(&mut || drop(black_box(serde_json::from_slice::<serde_json::Value>(black_box(&msg))))));
            full.push(time(&mut || drop(black_box(mapping.normalize_event_bytes(black_box(&msg))))));
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (a, b) = (median(&mut floor), median(&mut full));
        println!("| {name} | {:.0} msg/s ({a:.0} ns) | {:.0} msg/s ({b:.0} ns) | {:.2}x |", 1e9 / a, 1e9 / b, b / a);
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
