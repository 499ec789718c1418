//! The command line contract, run as a user runs it: the built binary on the sample mappings.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_iomt-connector"))
}

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn run(args: &[&str]) -> Output {
    let out = bin().args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output();
    out.unwrap_or_else(|e| panic!("cannot run iomt-connector: {e}"))
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const DEVICE: &str = "mappings/devicecontent.json";
const FHIR: &str = "mappings/fhirmapping.json";

/// (sample message, device type, LOINC code, value[x] or "component").
const SAMPLES: &[(&str, &str, &str, &str)] = &[
    ("heartrate", "heartrate", "8867-4", "valueSampledData"),
    ("spo2", "spo2", "59408-5", "valueSampledData"),
    ("bloodpressure", "bloodpressure", "85354-9", "component"),
    ("steps", "steps", "55423-8", "valueSampledData"),
    ("bodytemperature", "bodytemperature", "8310-5", "valueQuantity"),
    ("bloodglucose", "bloodglucose", "15074-8", "valueQuantity"),
];

#[test]
fn sample_mappings_validate() {
    let out = run(&["validate", "--device-mapping", DEVICE, "--fhir-mapping", FHIR]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("6 device template(s)") && text.contains("6 FHIR template(s)") && text.contains("valid"),
        "{text}"
    );
}

#[test]
fn every_sample_message_transforms() {
    let dir = repo("mappings/messages");
    let count = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or_default();
    assert_eq!(count, SAMPLES.len(), "a sample message without a row in SAMPLES");
    for (file, type_name, loinc, value) in SAMPLES {
        let msg = format!("mappings/messages/{file}.json");
        let out = run(&["normalize", "--device-mapping", DEVICE, &msg]);
        assert!(out.status.success(), "{msg}: {}", stderr(&out));
        let measurements = stdout_json(&out);
        let ms = measurements.as_array().cloned().unwrap_or_default();
        assert!(!ms.is_empty(), "{msg}: no measurement");
        assert!(ms.iter().all(|m| m["type"] == *type_name), "{msg}: {measurements}");

        let out = run(&["transform", "--device-mapping", DEVICE, "--fhir-mapping", FHIR, &msg]);
        assert!(out.status.success(), "{msg}: {}", stderr(&out));
        let obs = stdout_json(&out);
        let obs = obs.as_array().cloned().unwrap_or_default();
        assert_eq!(obs.len(), 1, "{msg}: one Observation");
        let o = &obs[0];
        assert_eq!(o["resourceType"], "Observation");
        assert_eq!(o["code"]["coding"][0]["code"], *loinc, "{msg}");
        assert!(o.get(*value).is_some(), "{msg}: no {value} in {o}");
        assert_eq!(o["subject"]["reference"].as_str().map(|s| s.len()), Some("Patient/".len() + 64), "{msg}");
        assert_eq!(o["id"].as_str().map(str::len), Some(64));
    }
}

#[test]
fn heart_rate_array_becomes_one_sampled_data_observation() {
    let out =
        run(&["transform", "--device-mapping", DEVICE, "--fhir-mapping", FHIR, "mappings/messages/heartrate.json"]);
    let obs = stdout_json(&out);
    let data = obs[0]["valueSampledData"]["data"].as_str().unwrap_or_default();
    let readings: Vec<&str> = data.split(' ').filter(|t| *t != "E").collect();
    assert_eq!(readings.len(), 10, "{data}");
    assert_eq!(data.split(' ').count(), 3600, "hourly window at 1 s");
}

#[test]
fn transform_batches_messages_in_order_across_files() {
    let args = [
        "transform",
        "--device-mapping",
        DEVICE,
        "--fhir-mapping",
        FHIR,
        "mappings/messages/spo2.json",
        "mappings/messages/bloodpressure.json",
    ];
    let out = run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let obs = stdout_json(&out);
    let codes: Vec<&str> =
        obs.as_array().into_iter().flatten().filter_map(|o| o["code"]["coding"][0]["code"].as_str()).collect();
    assert_eq!(codes, ["59408-5", "85354-9"]);
}

fn temp(name: &str, content: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("iomt-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap_or_else(|e| panic!("{e}"));
    p
}

#[test]
fn message_without_a_match_prints_an_empty_array() {
    let msg = temp("nomatch.json", r#"{"somethingElse": 1}"#);
    let out = run(&["normalize", "--device-mapping", DEVICE, msg.to_str().unwrap_or_default()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout_json(&out), serde_json::json!([]));
}

#[test]
fn normalization_errors_exit_1_with_one_line_naming_template_and_expression() {
    let cases = [
        ("notjson.json", r#"{"heartRate": 7"#, "not valid JSON"),
        ("missing.json", r#"{"heartRate": 70, "deviceId": "d", "patientId": "p"}"#, "`$.matchedToken.measurementTime`"),
        ("badtime.json", r#"{"heartRate": 70, "deviceId": "d", "measurementTime": "soon"}"#, "not a date-time"),
    ];
    for (name, body, expect) in cases {
        let msg = temp(name, body);
        let out = run(&["normalize", "--device-mapping", DEVICE, msg.to_str().unwrap_or_default()]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        assert!(out.stdout.is_empty(), "{name}: nothing on stdout");
        let err = stderr(&out);
        assert_eq!(err.trim_end().lines().count(), 1, "{name}: one line: {err}");
        assert!(err.contains(expect), "{name}: {err}");
        if name != "notjson.json" {
            assert!(err.contains("'heartrate'"), "{name}: names the typeName: {err}");
        }
    }
}

#[test]
fn envelope_flag_reads_the_whole_envelope() {
    let mapping = temp(
        "iot.json",
        r#"{"templateType": "CollectionContent", "template": [{"templateType": "IotJsonPathContent", "template": {
            "typeName": "heartrate", "typeMatchExpression": "$..[?(@Body.heartrate)]",
            "values": [{"valueName": "hr", "valueExpression": "$.Body.heartrate", "required": true}]}}]}"#,
    );
    let msg = temp(
        "iot-msg.json",
        r#"{"Body": {"heartrate": "203"}, "Properties": {"iothub-creation-time-utc": "2019-01-30T22:45:02.6073744Z"},
            "SystemProperties": {"iothub-connection-device-id": "dev-1"}}"#,
    );
    let out = run(&[
        "normalize",
        "--device-mapping",
        mapping.to_str().unwrap_or_default(),
        "--envelope",
        msg.to_str().unwrap_or_default(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = stdout_json(&out);
    assert_eq!(v[0]["deviceId"], "dev-1");
    assert_eq!(v[0]["occurrenceTimeUtc"], "2019-01-30T22:45:02.607Z");
    assert_eq!(v[0]["patientId"], Value::Null);
}

#[test]
fn validate_lists_every_problem_with_line_and_column() {
    let device = temp(
        "bad-device.json",
        r#"{
  "templateType": "CollectionContent",
  "template": [
    {
      "templateType": "CalculatedContent",
      "template": {
        "typeName": "heartrate",
        "typeMatchExpression": "$..[?(@heartRate)",
        "deviceIdExpression": "$.matchedToken.deviceId",
        "timestampExpression": { "value": "fromUnixTimestamp()", "language": "JmesPath" },
        "values": [ { "valueName": "hr", "valueExpression": "$.matchedToken.heartRate", "requird": true } ]
      }
    },
    {
      "templateType": "CalculatedContent",
      "template": {
        "typeName": "unknowntype",
        "typeMatchExpression": "$..[?(@x)]",
        "deviceIdExpression": "$.matchedToken.deviceId",
        "timestampExpression": "$.matchedToken.t",
        "values": [ { "valueName": "x", "valueExpression": "$.matchedToken.x" } ]
      }
    }
  ]
}"#,
    );
    let d = device.to_str().unwrap_or_default();
    let out = run(&["validate", "--device-mapping", d, "--fhir-mapping", FHIR]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    for expect in [
        format!(
            "{d}:8:32: CalculatedContent 'heartrate': typeMatchExpression `$..[?(@heartRate)` is not valid JsonPath"
        ),
        format!(
            "{d}:10:43: CalculatedContent 'heartrate': timestampExpression `fromUnixTimestamp()` is not valid JmesPath"
        ),
        format!("{d}:11:89: CalculatedContent 'heartrate': unknown member 'requird'"),
        format!("{d}:16:19: CalculatedContent 'unknowntype': no FHIR template has this typeName"),
        "4 problem(s) found".to_string(),
    ] {
        assert!(err.contains(&expect), "missing «{expect}» in:\n{err}");
    }

    // A value name the FHIR mapping does not use is a problem too.
    let unused = temp(
        "unused-value.json",
        r#"{"templateType": "CollectionContent", "template": [{"templateType": "JsonPathContent", "template": {
            "typeName": "heartrate", "typeMatchExpression": "$..[?(@hr)]", "deviceIdExpression": "$.d", "timestampExpression": "$.t",
            "values": [{"valueName": "pulse", "valueExpression": "$.hr"}]}}]}"#,
    );
    let out = run(&["validate", "--device-mapping", unused.to_str().unwrap_or_default(), "--fhir-mapping", FHIR]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("value 'pulse' is not used by FHIR template 'heartrate'"), "{}", stderr(&out));
}

#[test]
fn help_documents_each_command_with_an_example() {
    for cmd in ["normalize", "transform", "validate"] {
        let out = run(&[cmd, "--help"]);
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Example:") && text.contains(&format!("iomt-connector {cmd} --device-mapping")),
            "{cmd}: {text}"
        );
    }
}

#[test]
fn a_settings_error_never_prints_a_password() {
    for (var, value) in [
        ("IOMT_BROKER__URL", "guest:s3cret-pw@127.0.0.1:5672"),
        ("IOMT_BROKER__URL", "http://guest:s3cret-pw@127.0.0.1:5672"),
    ] {
        let out = bin().args(["run"]).env(var, value).current_dir(env!("CARGO_MANIFEST_DIR")).output();
        let out = out.unwrap_or_else(|e| panic!("cannot run iomt-connector: {e}"));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("broker.url") && err.contains("***@127.0.0.1"), "{err}");
        assert!(!err.contains("s3cret"), "the password is printed: {err}");
    }
    let endpoint = ("IOMT_EVENTHUBS__CUSTOM_ENDPOINT", "sb://user:s3cret-pw@127.0.0.1:5671");
    let out = bin()
        .args(["run"])
        .env("IOMT_SOURCE__KIND", "eventhubs")
        .env(endpoint.0, endpoint.1)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run iomt-connector: {e}"));
    let err = stderr(&out);
    assert!(err.contains("eventhubs.custom_endpoint") && !err.contains("s3cret"), "{err}");
}

#[test]
fn the_mapping_debugger_refuses_an_open_address_without_a_token() {
    let out = run(&["studio", "--listen", "0.0.0.0:0"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("without --token") && err.contains("0.0.0.0:0"), "{err}");
}
