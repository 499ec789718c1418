//! The operations pack (ops/) against the connector itself: `promtool check metrics` on a live
//! /metrics, the Grafana dashboard's queries parsed by promtool and naming only metrics the
//! connector exports, the alert rules likewise, and the `health` probe the container image uses.
//! promtool comes from Debian's prometheus package (scripts/setup.sh); its absence fails the test.

mod common;

use common::services::{self, Connector, Setup};
use iomt_connector::metrics::MetricType;
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn promtool(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): scripts/setup.sh installs it (Debian package prometheus)")
        });
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input).unwrap_or_else(|e| panic!("{e}"));
    }
    child.wait_with_output().unwrap_or_else(|e| panic!("{e}"))
}

fn said(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Every name the connector exports, as a query names it: histograms by their series.
fn exported() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (name, kind) in iomt_connector::metrics::catalogue() {
        if kind == MetricType::HISTOGRAM {
            names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}")));
        }
        names.insert(name);
    }
    names
}

/// The `iomt_*` names in a text (PromQL, YAML or JSON): identifiers as PromQL reads them.
fn iomt_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("iomt_"))
        .map(str::to_string)
        .collect()
}

/// The dashboard's panel queries, with Grafana's variables replaced as Grafana would before
/// sending them: intervals by a duration, `$instance` (used inside =~ matchers) by `.*`.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo("ops/grafana-dashboard.json")).unwrap_or_else(|e| panic!("{e}"));
    let dash: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("ops/grafana-dashboard.json: {e}"));
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().into_iter().flatten() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("a target without expr in {}", panel["title"]));
            let expr = ["$__rate_interval", "$__interval", "$__range"]
                .iter()
                .fold(expr.to_string(), |e, v| e.replace(v, "5m"))
                .replace("$instance", ".*");
            assert!(!expr.contains('$'), "a Grafana variable this test does not know in {expr}");
            out.push((format!("{} ({})", panel["title"], t["refId"]), expr));
        }
    }
    out
}

#[test]
fn every_dashboard_query_parses_and_names_exported_metrics() {
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "only {} queries", queries.len());
    // promtool parses PromQL only inside rules: each query becomes a recording rule. JSON is YAML.
    let rules: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": expr}))
        .collect();
    let file = std::env::temp_dir().join(format!("iomt-dashboard-rules-{}.json", std::process::id()));
    let body = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(&file, body.to_string()).unwrap_or_else(|e| panic!("{e}"));
    let out = promtool(&["check", "rules", file.to_str().unwrap_or_default()], None);
    assert!(out.status.success(), "a dashboard query does not parse:\n{}", said(&out));

    let exported = exported();
    let mut used = BTreeSet::new();
    for (panel, expr) in &queries {
        for name in iomt_names(expr) {
            assert!(exported.contains(&name), "{panel}: {name} is not a metric the connector exports");
            used.insert(name.trim_end_matches("_bucket").to_string());
        }
    }
    let unshown: Vec<_> =
        iomt_connector::metrics::catalogue().into_iter().map(|(n, _)| n).filter(|n| !used.contains(n)).collect();
    assert!(unshown.is_empty(), "metrics no dashboard panel shows: {unshown:?}");
}

#[test]
fn the_alert_rules_check_and_name_exported_metrics() {
    let out = promtool(&["check", "rules", repo("ops/alerts.yml").to_str().unwrap_or_default()], None);
    assert!(out.status.success(), "{}", said(&out));
    let text = std::fs::read_to_string(repo("ops/alerts.yml")).unwrap_or_else(|e| panic!("{e}"));
    let exported = exported();
    for name in iomt_names(&text) {
        assert!(exported.contains(&name), "ops/alerts.yml names {name}, which the connector does not export");
    }
    for alert in [
        "IomtFhirCircuitOpen",
        "IomtDeadLettersRising",
        "IomtBacklogGrowing",
        "IomtInFlightWindowFull",
        "IomtMappingReloadRefused",
        "IomtEventHubsCheckpointLag",
    ] {
        assert!(text.contains(&format!("alert: {alert}")), "{alert} is missing");
    }
}

/// The sample messages with ids of this run's own, so no other test's Observations are touched.
fn messages(run: &str) -> Vec<Vec<u8>> {
    let mut bodies: Vec<Vec<u8>> = ["heartrate", "bloodpressure", "bodytemperature"]
        .iter()
        .map(|m| {
            let text =
                std::fs::read_to_string(repo(&format!("mappings/messages/{m}.json"))).unwrap_or_else(|e| panic!("{e}"));
            text.replace("\"device-", &format!("\"{run}-device-"))
                .replace("\"patient-", &format!("\"{run}-patient-"))
                .into_bytes()
        })
        .collect();
    bodies.push(b"{\"heartRate\": ".to_vec());
    bodies
}

#[tokio::test(flavor = "multi_thread")]
async fn a_live_metrics_page_passes_promtool_and_the_health_probe_answers() {
    let queue = services::unique("ops");
    let connector = Connector::start(&Setup::new(&queue, "Create", &format!("urn:iomt-test:{queue}"))).await;
    let conn = services::broker().await;
    let channel = conn.create_channel().await.unwrap_or_else(|e| panic!("{e}"));
    let bodies = messages(&queue);
    services::publish(&channel, &queue, &bodies).await;
    connector.wait_acked(bodies.len() as f64, Duration::from_secs(60)).await;

    let (status, page) = connector.get("/metrics").await;
    assert_eq!(status, 200);
    let out = promtool(&["check", "metrics"], Some(page.as_bytes()));
    assert!(out.status.success(), "promtool check metrics:\n{}", said(&out));
    // The page and the catalogue the dashboard test checks against agree.
    let exported = exported();
    for name in iomt_names(&page) {
        assert!(exported.contains(&name), "{name} is on /metrics but not in metrics::catalogue()");
    }
    for name in
        ["iomt_dead_lettered_total", "iomt_fhir_requests_total", "iomt_in_flight_bytes_limit", "iomt_mappings_refused"]
    {
        assert!(page.contains(&format!("\n{name}")), "{name} is not on the live page:\n{page}");
    }

    // The container's HEALTHCHECK: `health` with the image's 0.0.0.0 listen address probes loopback.
    let port = connector.http.rsplit(':').next().unwrap_or_default().to_string();
    let health = Command::new(env!("CARGO_BIN_EXE_iomt-connector"))
        .arg("health")
        .env("IOMT_HTTP__LISTEN", format!("0.0.0.0:{port}"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(health.status.success(), "{}", said(&health));
    assert!(String::from_utf8_lossy(&health.stdout).contains("\"live\""), "{}", said(&health));
}

/// Docker is not assumed here, so the image's promises are checked in its files: the builder is
/// pinned, the binary stripped, the health check is the connector's own probe (no curl), and the
/// compose broker has the plugin `broker.topology = "sharded"` needs.
#[test]
fn the_image_and_compose_files_keep_their_promises() {
    let read = |p: &str| std::fs::read_to_string(repo(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let dockerfile = read("docker/Dockerfile");
    let builder = dockerfile.lines().find(|l| l.starts_with("FROM rust:")).unwrap_or_default();
    let tag = builder.trim_start_matches("FROM rust:").split_whitespace().next().unwrap_or_default();
    assert!(tag.split(['-', '@']).next().is_some_and(|v| v.split('.').count() == 3), "builder not pinned: {builder}");
    assert!(dockerfile.contains("CARGO_PROFILE_RELEASE_STRIP=symbols"), "the binary is not stripped");
    let health = dockerfile.lines().skip_while(|l| !l.starts_with("HEALTHCHECK")).nth(1).unwrap_or_default();
    assert!(health.contains(r#"CMD ["iomt-connector", "health""#), "HEALTHCHECK: {health}");
    let uses_curl = dockerfile.lines().any(|l| !l.trim_start().starts_with('#') && l.contains("curl"));
    assert!(!uses_curl, "the image should not need curl");
    assert!(read("docker/rabbitmq/enabled_plugins").contains("rabbitmq_consistent_hash_exchange"));
    let compose = read("docker/compose.yaml");
    assert!(compose.contains("./rabbitmq/enabled_plugins:/etc/rabbitmq/enabled_plugins"), "plugins not mounted");
    assert!(compose.contains("image: postgres:") && compose.contains("IOMT_EVENTHUBS__CHECKPOINT_POSTGRES_URL"));
}
