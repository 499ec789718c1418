//! Normalization throughput, single thread, beside the floor: `serde_json::from_slice` of the same
//! message alone. `cargo bench --bench normalize`; each line's thrpt is messages per second.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
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

fn bench(c: &mut Criterion) {
    let ten: Vec<String> = (0..10).map(reading).collect();
    let cases: Vec<(&str, &str, Vec<u8>, usize)> = vec![
        (
            "heart-rate CalculatedContent",
            HEART_RATE,
            envelope(&reading(1)),
            1,
        ),
        (
            "JMESPath template",
            JMESPATH,
            envelope(r#"{"heartRate": 78, "ts": 1626799080000, "deviceId": "device123"}"#),
            1,
        ),
        (
            "10-reading array",
            HEART_RATE,
            envelope(&format!("[{}]", ten.join(","))),
            10,
        ),
    ];
    let mut g = c.benchmark_group("normalize");
    g.throughput(Throughput::Elements(1));
    for (name, mapping, msg, expected) in cases {
        let mapping = DeviceMapping::parse(mapping).unwrap_or_else(|e| panic!("{e}"));
        let n = mapping.normalize_event_bytes(&msg).map(|m| m.len());
        assert_eq!(n, Ok(expected), "{name}");
        g.bench_with_input(
            BenchmarkId::new("serde_json::from_slice (floor)", name),
            &msg,
            |b, msg| b.iter(|| serde_json::from_slice::<serde_json::Value>(black_box(msg))),
        );
        g.bench_with_input(
            BenchmarkId::new("parse + normalize", name),
            &msg,
            |b, msg| b.iter(|| mapping.normalize_event_bytes(black_box(msg))),
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
