//! Live mapping reload on the running service (real RabbitMQ and FHIR server): a changed mapping
//! applies to the messages after the swap; an invalid one is refused, the old one keeps running,
//! and nothing is lost.

mod common;

use common::services::{self, Bed, Connector, Fhir, Setup};
use common::vitals::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// The sample device mapping with the heart-rate value read from `field`.
fn device_mapping(field: &str) -> String {
    let text = std::fs::read_to_string(services::repo_path("mappings/devicecontent.json")).unwrap_or_default();
    let mut mapping: Value = serde_json::from_str(&text).unwrap_or_default();
    for t in mapping["template"].as_array_mut().into_iter().flatten() {
        if t["template"]["typeName"] == "heartrate" {
            t["template"]["values"][0]["valueExpression"] = json!(format!("$.matchedToken.{field}"));
        }
    }
    serde_json::to_string_pretty(&mapping).unwrap_or_default()
}

/// Replaces a file the way an editor or a deployment does: write aside, rename over.
fn replace(path: &Path, text: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, text).unwrap_or_else(|e| panic!("{e}"));
    std::fs::rename(&aside, path).unwrap_or_else(|e| panic!("{e}"));
}

async fn ready(c: &Connector) -> Value {
    serde_json::from_str(&c.get("/health/ready").await.1).unwrap_or_default()
}

/// A heart-rate message whose `pulse` field differs from its `heartRate`.
fn message_with_pulse(run: &str, i: usize) -> Vec<u8> {
    let mut m = message(run, 0, i, Vital::HeartRate);
    m["pulse"] = json!(200 + i);
    serde_json::to_vec(&m).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_mapping_applies_to_the_messages_after_the_swap_and_an_invalid_one_is_refused() {
    let Bed { run, system, queue, ch, _conn } = services::bed("reload").await;
    let dir = std::env::temp_dir().join(&run);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let device = dir.join("device.json");
    std::fs::write(&device, device_mapping("heartRate")).unwrap_or_else(|e| panic!("{e}"));
    let mut setup = Setup::new(&queue, "Create", &system);
    setup.device_mapping = device.clone();
    setup.extra.push(("IOMT_PIPELINE__FLUSH_INTERVAL_MS", "100".into()));
    let c = Connector::start(&setup).await;
    let first = ready(&c).await["mappingsVersion"].clone();

    // One device, a reading a second (one SampledData slot each), streamed while the mapping
    // changes from heartRate to pulse.
    let total = 90;
    let streaming = {
        let (queue, run) = (queue.clone(), run.clone());
        tokio::spawn(async move {
            let conn = services::broker().await;
            let ch = conn.create_channel().await.unwrap_or_else(|e| panic!("{e}"));
            for i in 0..60 {
                services::publish(&ch, &queue, &[message_with_pulse(&run, i)]).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1200)).await;
    replace(&device, &device_mapping("pulse"));
    let swapped = Instant::now();
    let mut second = first.clone();
    while second == first {
        assert!(swapped.elapsed() < Duration::from_secs(10), "the new mapping was not applied:\n{}", c.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
        second = ready(&c).await["mappingsVersion"].clone();
    }
    streaming.await.unwrap_or_else(|e| panic!("{e}"));
    c.wait_acked(60.0, Duration::from_secs(60)).await;

    // An invalid change (a syntax error on line 3) is refused; the mapping in force keeps running.
    replace(&device, "{\n  \"templateType\": \"CollectionContent\",\n  \"template\": [ oops ]\n}\n");
    let refused_at = Instant::now();
    let refusal = loop {
        let r = ready(&c).await;
        if let Some(why) = r["mappingsRefused"].as_str() {
            assert_eq!(r["mappingsVersion"], second, "the valid mapping stays in force");
            assert_eq!(r["status"], "ready", "{r}");
            break why.to_string();
        }
        assert!(refused_at.elapsed() < Duration::from_secs(10), "the invalid mapping was not refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(refusal.contains("device.json:3:"), "the refusal names the line: {refusal}");
    assert!(c.log().contains("new mappings refused"), "{}", c.log());
    let rest: Vec<Vec<u8>> = (60..total).map(|i| message_with_pulse(&run, i)).collect();
    services::publish(&ch, &queue, &rest).await;
    c.wait_acked(total as f64, Duration::from_secs(60)).await;
    let m = c.metrics().await;
    assert_eq!(m.get("iomt_mapping_reloads_total{result=\"applied\"}"), Some(&1.0), "{m:?}");
    assert!(ready(&c).await.get("mappingsRefused").is_some(), "the refusal stays shown until a reload succeeds");
    assert!(m.get("iomt_mapping_reloads_total{result=\"refused\"}").copied().unwrap_or(0.0) >= 1.0);
    assert_eq!(m.get("iomt_mappings_refused"), Some(&1.0), "what ops/alerts.yml's IomtMappingReloadRefused reads");

    // The refused file restored to the running text: nothing to reload, and the refusal ends (issue 19, item 2).
    replace(&device, &device_mapping("pulse"));
    let restored = Instant::now();
    while ready(&c).await.get("mappingsRefused").is_some() {
        assert!(restored.elapsed() < Duration::from_secs(10), "restoring the running text left the refusal shown");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready(&c).await["mappingsVersion"], second, "the same pair runs on");
    assert_eq!(c.metric("iomt_mappings_refused").await, 0.0);

    // SIGHUP reloads at once, even a change the file watch cannot see (same modification time).
    let stamp = std::fs::metadata(&device).and_then(|m| m.modified()).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&device, device_mapping("heartRate")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::File::options()
        .write(true)
        .open(&device)
        .and_then(|f| f.set_modified(stamp))
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(ready(&c).await["mappingsVersion"], second, "the watch alone does not see it");
    c.signal("HUP");
    let hup = Instant::now();
    while ready(&c).await["mappingsVersion"] != first {
        assert!(hup.elapsed() < Duration::from_secs(10), "SIGHUP did not reload:\n{}", c.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(c.metric("iomt_mappings_refused").await, 0.0, "a reload that loads ends the refusal");

    // Slots before the swap hold heartRate, those after it pulse: one switch, nothing lost.
    let obs = Fhir::new().search(&format!("Observation?subject=Patient/{}", patient_id(&run, 0))).await;
    let hr_obs: Vec<&Value> = obs.iter().filter(|o| loinc(o) == "8867-4").collect();
    assert_eq!(hr_obs.len(), 1, "{obs:?}");
    let got = decode(&hr_obs[0]["valueSampledData"]);
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), (0..total).collect::<Vec<_>>(), "every reading");
    let switch = (0..total).find(|i| got[i] == (200 + i).to_string()).unwrap_or(total);
    let want: BTreeMap<usize, String> =
        (0..total).map(|i| (i, if i < switch { hr(0, i) } else { 200 + i }.to_string())).collect();
    assert_eq!(got, want, "one switch from heartRate to pulse, at reading {switch}");
    assert!(switch > 0 && switch < 60, "the swap happened while messages flowed (at reading {switch})");
    println!("mapping swapped at reading {switch} of 60 streamed; the invalid change was refused: {refusal}");
    services::delete_queue(&ch, &queue).await;
}
