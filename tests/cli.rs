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
    assert_eq!(out.status.code(), Some(3), "the mapping does not load");
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
            text.contains("Example") && text.contains(&format!("iomt-connector {cmd} --device-mapping")),
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

fn run_with_stdin(args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = bin()
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run iomt-connector: {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        // A command that refuses its arguments exits before reading: the pipe is closed on us.
        if let Err(e) = stdin.write_all(input)
            && e.kind() != std::io::ErrorKind::BrokenPipe
        {
            panic!("{e}");
        }
    }
    child.wait_with_output().unwrap_or_else(|e| panic!("{e}"))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

#[test]
fn transform_prints_what_converts_and_one_line_per_failure() {
    let bad_json = temp("t-notjson.json", r#"{"heartRate": 7"#);
    let missing = temp("t-missing.json", r#"{"heartRate": 70, "deviceId": "d", "patientId": "p"}"#);
    let out = run(&[
        "transform",
        "--device-mapping",
        DEVICE,
        "--fhir-mapping",
        FHIR,
        "mappings/messages/heartrate.json",
        path(&bad_json),
        path(&missing),
        "mappings/messages/spo2.json",
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let obs = stdout_json(&out);
    let codes: Vec<&str> =
        obs.as_array().into_iter().flatten().filter_map(|o| o["code"]["coding"][0]["code"].as_str()).collect();
    assert_eq!(codes, ["8867-4", "59408-5"], "the messages that convert are printed");
    let lines: Vec<&str> = err.trim_end().lines().collect();
    assert_eq!(lines.len(), 2, "one line per failure: {err}");
    assert!(lines[0].contains(path(&bad_json)) && lines[0].contains("not valid JSON"), "{err}");
    assert!(lines[1].contains(path(&missing)) && lines[1].contains("measurementTime"), "{err}");
}

#[test]
fn exit_status_tells_usage_from_an_invalid_mapping() {
    let broken = temp("broken-device.json", r#"{"templateType": "CollectionContent", "template": [}"#);
    let msg = "mappings/messages/heartrate.json";
    for args in [
        vec!["normalize", "--device-mapping", path(&broken), msg],
        vec!["transform", "--device-mapping", path(&broken), "--fhir-mapping", FHIR, msg],
        vec!["validate", "--device-mapping", path(&broken), "--fhir-mapping", FHIR],
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(&format!("{}:1:", path(&broken))), "{args:?} names the place: {}", stderr(&out));
    }
    for args in [
        vec!["normalize", "--device-mapping", "no/such/file.json", msg],
        vec!["transform", "--device-mapping", DEVICE, "--fhir-mapping", FHIR, "no/such/message.json"],
        vec!["validate", "--no-such-flag"],
        vec!["transform", "--device-mapping", DEVICE, "--fhir-mapping", FHIR, "--identity-mode", "Guess", msg],
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
    // `run` refuses the mapping before it connects to anything.
    let out = bin()
        .args(["run"])
        .env("IOMT_MAPPINGS__DEVICE", path(&broken))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run iomt-connector: {e}"));
    assert_eq!(out.status.code(), Some(3), "run: {}", stderr(&out));
    assert!(stderr(&out).contains("the device mapping is invalid"), "{}", stderr(&out));

    let out = run(&["--help"]);
    let help = stdout(&out);
    for line in ["Exit status:", "2  usage", "3  invalid mapping"] {
        assert!(help.contains(line), "--help documents the exit statuses: {help}");
    }
    for cmd in ["normalize", "transform", "validate", "run", "config", "health"] {
        let help = stdout(&run(&[cmd, "--help"]));
        assert!(help.contains("Exit status:"), "{cmd} --help: {help}");
    }
}

#[test]
fn validate_json_reports_every_problem_as_data() {
    let out = run(&["validate", "--json", "--device-mapping", DEVICE, "--fhir-mapping", FHIR]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = stdout_json(&out);
    assert_eq!(v["valid"], true);
    assert_eq!(v["deviceMapping"]["templates"], 6);
    assert_eq!(v["fhirMapping"]["templates"], 6);
    assert_eq!(v["problems"], serde_json::json!([]));

    let device = temp(
        "json-bad-device.json",
        r#"{"templateType": "CollectionContent", "template": [{"templateType": "JsonPathContent", "template": {
            "typeName": "heartrate", "typeMatchExpression": "$..[?(@hr)", "deviceIdExpression": "$.d",
            "timestampExpression": "$.t", "values": [{"valueName": "hr", "valueExpression": "$.hr"}]}}]}"#,
    );
    let out = run(&["validate", "--json", "--device-mapping", path(&device), "--fhir-mapping", FHIR]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let v = stdout_json(&out);
    assert_eq!((v["valid"].clone(), v["loads"].clone()), (Value::Bool(false), Value::Bool(false)));
    let p = &v["problems"][0];
    assert_eq!(
        (p["file"].as_str(), p["line"].as_u64(), p["column"].as_u64()),
        (Some(path(&device)), Some(2), Some(61))
    );
    assert!(p["message"].as_str().unwrap_or_default().contains("is not valid JsonPath"), "{p}");

    // Loads, but a value no FHIR template uses: exit 1, a cross-check problem.
    let unused = temp(
        "json-unused.json",
        r#"{"templateType": "CollectionContent", "template": [{"templateType": "JsonPathContent", "template": {
            "typeName": "heartrate", "typeMatchExpression": "$..[?(@hr)]", "deviceIdExpression": "$.d", "timestampExpression": "$.t",
            "values": [{"valueName": "pulse", "valueExpression": "$.hr"}]}}]}"#,
    );
    let out = run(&["validate", "--json", "--device-mapping", path(&unused), "--fhir-mapping", FHIR]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v = stdout_json(&out);
    assert_eq!((v["loads"].clone(), v["problems"][0]["crossCheck"].clone()), (Value::Bool(true), Value::Bool(true)));
}

#[test]
fn a_dash_reads_the_message_from_stdin() {
    let body = std::fs::read(repo("mappings/messages/bodytemperature.json")).unwrap_or_else(|e| panic!("{e}"));
    let out = run_with_stdin(&["normalize", "--device-mapping", DEVICE, "-"], &body);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout_json(&out)[0]["type"], "bodytemperature");

    let args = ["transform", "--device-mapping", DEVICE, "--fhir-mapping", FHIR, "mappings/messages/spo2.json", "-"];
    let out = run_with_stdin(&args, &body);
    assert!(out.status.success(), "{}", stderr(&out));
    let obs = stdout_json(&out);
    assert_eq!(obs.as_array().map(Vec::len), Some(2), "{obs}");

    let out = run_with_stdin(&["normalize", "--device-mapping", DEVICE, "-"], b"{\"heartRate\": ");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("(stdin)"), "names stdin: {}", stderr(&out));

    let out = run_with_stdin(&["transform", "--device-mapping", DEVICE, "--fhir-mapping", FHIR, "-", "-"], &body);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("once"), "{}", stderr(&out));
}

#[test]
fn completions_are_generated_for_each_shell() {
    for (shell, marker) in
        [("bash", "complete -F"), ("zsh", "#compdef iomt-connector"), ("fish", "complete -c iomt-connector")]
    {
        let out = run(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let text = stdout(&out);
        assert!(text.contains(marker), "{shell}: {text:.300}");
        for cmd in ["transform", "dead-letters", "redrive", "completions"] {
            assert!(text.contains(cmd), "{shell} completes {cmd}");
        }
    }
    assert_eq!(run(&["completions", "tcsh"]).status.code(), Some(2));
}

/// Modelled on Microsoft's basic MedTech sample: no patientIdExpression, so Create mode cannot work.
const BASIC_DEVICE: &str = r#"{"templateType": "CollectionContent", "template": [{"templateType": "CalculatedContent",
    "template": {"typeName": "heartrate", "typeMatchExpression": "$..[?(@heartRate)]",
    "deviceIdExpression": "$.matchedToken.deviceId", "timestampExpression": "$.matchedToken.endDate",
    "encounterIdExpression": "$.matchedToken.visit",
    "values": [{"required": true, "valueExpression": "$.matchedToken.heartRate", "valueName": "hr"}]}}]}"#;
const BASIC_FHIR: &str = r#"{"templateType": "CollectionFhir", "template": [{"templateType": "CodeValueFhir",
    "template": {"codes": [{"code": "8867-4", "system": "http://loinc.org", "display": "Heart rate"}],
    "periodInterval": 0, "typeName": "heartrate",
    "value": {"unit": "count/min", "valueName": "hr", "valueType": "Quantity"}}}]}"#;

#[test]
fn transform_resolves_lookup_identities_from_a_file() {
    let (device, fhir) = (temp("basic-device.json", BASIC_DEVICE), temp("basic-fhir.json", BASIC_FHIR));
    let msg = temp(
        "basic-msg.json",
        r#"{"heartRate": "78", "endDate": "2021-09-01T10:00:00Z", "deviceId": "device01", "visit": "v-7"}"#,
    );
    let base = ["transform", "--device-mapping", path(&device), "--fhir-mapping", path(&fhir)];
    let with = |extra: &[&str]| run(&[&base[..], extra, &[path(&msg)]].concat());

    let out = with(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("Create identity needs a patient id") && stderr(&out).contains("identity mode Lookup")
    );

    let ids = temp(
        "identities.json",
        r#"{"devices": {"device01": {"device": "Device/dev-a", "patient": "Patient/pat-1"}}, "encounters": {"v-7": "Encounter/enc-7"}}"#,
    );
    let out = with(&["--identity-mode", "Lookup", "--identities", path(&ids)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let o = &stdout_json(&out)[0];
    assert_eq!(
        (o["subject"]["reference"].as_str(), o["device"]["reference"].as_str()),
        (Some("Patient/pat-1"), Some("Device/dev-a"))
    );
    assert!(o.get("encounter").is_none(), "Lookup leaves the encounter out: {o}");
    assert_eq!(o["valueQuantity"]["value"], 78);

    let out = with(&["--identity-mode", "LookupWithEncounter", "--identities", path(&ids)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout_json(&out)[0]["encounter"]["reference"], "Encounter/enc-7");

    let other = temp("identities-other.json", r#"{"devices": {"device02": {"device": "d2", "patient": "p2"}}}"#);
    let out = with(&["--identity-mode", "lookup", "--identities", path(&other)]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout_json(&out), serde_json::json!([]));
    assert!(stderr(&out).contains("'device01'") && stderr(&out).contains(path(&other)), "{}", stderr(&out));

    let out = with(&["--identity-mode", "Lookup"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--identities"), "{}", stderr(&out));
    let bad = temp("identities-bad.json", r#"{"devices": {"device01": {"patient": "p"}}}"#);
    let out = with(&["--identity-mode", "Lookup", "--identities", path(&bad)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains(path(&bad)) && stderr(&out).contains("device"), "{}", stderr(&out));
}

/// Every setting that holds a secret, set to a value containing MARK.
const MARK: &str = "s3cret-mark";

fn secret_env() -> Vec<(&'static str, String)> {
    vec![
        ("IOMT_BROKER__URL", format!("amqp://guest:{MARK}@127.0.0.1:5672/%2f")),
        ("IOMT_BROKER__MANAGEMENT_URL", format!("http://guest:{MARK}@127.0.0.1:15672")),
        ("IOMT_FHIR__AUTH", "bearer".into()),
        ("IOMT_FHIR__BEARER_TOKEN", MARK.into()),
        ("IOMT_FHIR__OAUTH2_CLIENT_SECRET", MARK.into()),
        (
            "IOMT_EVENTHUBS__CONNECTION_STRING",
            format!("Endpoint=sb://ns/;SharedAccessKeyName=a;SharedAccessKey={MARK};EntityPath=h"),
        ),
        ("IOMT_EVENTHUBS__CLIENT_SECRET", MARK.into()),
        ("IOMT_EVENTHUBS__CUSTOM_ENDPOINT", format!("sb://u:{MARK}@127.0.0.1:5671")),
        ("IOMT_EVENTHUBS__CHECKPOINT_POSTGRES_URL", format!("host=db user=iomt password={MARK} dbname=iomt")),
        ("IOMT_HTTP__DEBUGGER_TOKEN", MARK.into()),
    ]
}

#[test]
fn config_prints_the_effective_settings_without_secrets() {
    let cmd = |args: &[&str], env: &[(&str, String)]| {
        let out = bin()
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output();
        out.unwrap_or_else(|e| panic!("cannot run iomt-connector: {e}"))
    };
    let mut env = secret_env();
    env.push(("IOMT_PIPELINE__SHARDS", "3".into()));
    let out = cmd(&["config"], &env);
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!text.contains("s3cret") && !stderr(&out).contains("s3cret"), "a secret is printed:\n{text}");
    for expect in [
        "shards = 3",
        "url = \"amqp://***@127.0.0.1:5672/%2f\"",
        "bearer_token = \"***\"",
        "password=*** dbname=iomt",
        "SharedAccessKey=***;",
    ] {
        assert!(text.contains(expect), "missing «{expect}» in:\n{text}");
    }
    // What it prints is a settings file: read back, it prints the same.
    let file = temp("effective.toml", &text);
    let again = cmd(&["config", "--config", path(&file)], &[]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(stdout(&again), text);

    let json = cmd(&["config", "--json"], &env);
    let v = stdout_json(&json);
    assert_eq!((v["pipeline"]["shards"].as_u64(), v["fhir"]["oauth2_client_secret"].as_str()), (Some(3), Some("***")));

    // Settings that do not validate are still shown, with the problems and exit status 2.
    let out = cmd(&["config"], &[("IOMT_PIPELINE__SHARDS", "0".into())]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stdout(&out).contains("shards = 0") && stderr(&out).contains("pipeline.shards"), "{}", stderr(&out));
}

#[test]
fn health_fails_without_an_answer_and_refuses_a_bad_url() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port());
    let url = format!("http://127.0.0.1:{}/health/live", port.unwrap_or_else(|e| panic!("{e}")));
    let out = run(&["health", "--url", &url, "--timeout-secs", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&url) && stderr(&out).contains("http.listen"), "{}", stderr(&out));
    let out = run(&["health", "--url", "ftp://127.0.0.1/x"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
