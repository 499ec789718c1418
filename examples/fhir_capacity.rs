//! The FHIR server's own write capacity, for scripts/bench.sh: a bare client that writes the
//! Observations the connector would write for the same simulated messages (normalized and
//! transformed by the engine with the sample mappings, Create identity), with nothing else in the
//! way: no broker, no reads, no merging, no identity lookups.
//!
//!   cargo run --release --example fhir_capacity -- BASE_URL PROFILE MESSAGES DEVICES MODE BATCH CONCURRENCY WRITES [PREFIX]
//!
//! PROFILE is vitals | spot; MODE is batch (PUTs in `batch` Bundles of BATCH entries, as the
//! connector sends them) or single (one PUT per request). CONCURRENCY requests are in flight at
//! once (the connector's `pipeline.writers`). The Observations are written round-robin until WRITES
//! writes are done (the first round creates, later rounds update, as the connector does for a
//! window that grows). Patients and Devices are written first, untimed.
//! Prints one line: `writes seconds writes_per_second observations messages`.

use futures_util::future::join_all;
use iomt_connector::fhir::parse_etag;
use iomt_connector::model::ids;
use iomt_connector::simulate::{Profile, message};
use iomt_connector::template::device::DeviceMapping;
use iomt_connector::template::fhir::FhirMapping;
use iomt_connector::transform::{CreateIdentity, transform};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

fn arg<T: std::str::FromStr>(args: &[String], i: usize, name: &str) -> T {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or_else(|| {
        eprintln!(
            "usage: fhir_capacity BASE_URL vitals|spot MESSAGES DEVICES batch|single BATCH CONCURRENCY WRITES [PREFIX] (bad {name})"
        );
        std::process::exit(2)
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let base: String = arg::<String>(&args, 1, "BASE_URL").trim_end_matches('/').to_string();
    let profile = match arg::<String>(&args, 2, "PROFILE").as_str() {
        "vitals" => Profile::Vitals,
        "spot" => Profile::Spot,
        other => panic!("profile {other}: vitals or spot"),
    };
    let messages: u64 = arg(&args, 3, "MESSAGES");
    let devices: usize = arg(&args, 4, "DEVICES");
    let single = match arg::<String>(&args, 5, "MODE").as_str() {
        "batch" => false,
        "single" => true,
        other => panic!("mode {other}: batch or single"),
    };
    let batch: usize = arg::<usize>(&args, 6, "BATCH").max(1);
    let concurrency: usize = arg::<usize>(&args, 7, "CONCURRENCY").max(1);
    let writes: usize = arg(&args, 8, "WRITES");
    let prefix = args.get(9).cloned().unwrap_or_else(|| format!("cap-{}", std::process::id()));
    let system = format!("urn:{prefix}");

    let observations = observations(profile, &prefix, &system, messages, devices);
    let identities = identities(&prefix, &system, devices);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(async {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        for chunk in identities.chunks(200) {
            post_batch(&http, &base, chunk.iter().map(|(t, id, r)| (t.as_str(), id.as_str(), r)), None).await;
        }

        let versions = Arc::new(Versions::default());
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let plan = Plan { single, batch, concurrency, writes };
        join_all((0..concurrency).map(|w| write_share(w, &plan, &http, &base, &observations, &next, &versions))).await;
        let secs = started.elapsed().as_secs_f64();
        println!("{writes} {secs:.3} {:.0} {} {messages}", writes as f64 / secs, observations.len());
    });
}

/// How the writes are sent.
struct Plan {
    single: bool,
    batch: usize,
    concurrency: usize,
    writes: usize,
}

/// The Observations, exactly as the engine builds them, by id.
fn observations(profile: Profile, prefix: &str, system: &str, messages: u64, devices: usize) -> Vec<(String, Value)> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    let device = DeviceMapping::parse(&read("mappings/devicecontent.json")).unwrap_or_else(|e| panic!("{e:?}"));
    let fhir = FhirMapping::parse(&read("mappings/fhirmapping.json")).unwrap_or_else(|e| panic!("{e:?}"));
    let mut rng = fastrand::Rng::with_seed(7);
    let mut measurements = Vec::new();
    for k in 0..messages {
        let d = (k % devices as u64) as usize;
        let body = message(profile, prefix, d, k / devices as u64, &mut rng, chrono::Utc::now());
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        measurements.extend(device.normalize_body(&bytes).unwrap_or_else(|e| panic!("{e}")));
    }
    let identity = CreateIdentity { device_system: Some(system.to_string()) };
    let built = transform(&fhir, measurements, &identity, chrono::Utc::now());
    assert!(built.errors.is_empty(), "{:?}", built.errors);
    built
        .observations
        .iter()
        .map(|o| (o.id.clone().unwrap_or_default(), serde_json::to_value(o.for_write()).unwrap_or_default()))
        .collect()
}

/// Create identity's Patient and Device for every simulated device.
fn identities(prefix: &str, system: &str, devices: usize) -> Vec<(String, String, Value)> {
    let mut identities = Vec::new();
    for d in 0..devices {
        let (p, dev) = (format!("{prefix}-pat-{d}"), format!("{prefix}-dev-{d}"));
        let (pid, did) = (ids::resource_id(None, &p), ids::resource_id(Some(system), &dev));
        identities.push((
            "Patient".to_string(),
            pid.clone(),
            json!({"resourceType": "Patient", "id": pid, "identifier": [{"value": p}]}),
        ));
        identities.push((
            "Device".to_string(),
            did.clone(),
            json!({"resourceType": "Device", "id": did, "identifier": [{"system": system, "value": dev}],
                   "patient": {"reference": format!("Patient/{pid}")}}),
        ));
    }
    identities
}

/// Worker `w`'s share of the writes. Each worker writes its own share of the Observations, as each
/// of the connector's writers owns its devices: one Observation is never written by two requests
/// at once.
async fn write_share(
    w: usize,
    plan: &Plan,
    http: &reqwest::Client,
    base: &str,
    observations: &[(String, Value)],
    next: &AtomicUsize,
    versions: &Versions,
) {
    let mine: Vec<&(String, Value)> = observations.iter().skip(w).step_by(plan.concurrency).collect();
    let step = if plan.single { 1 } else { plan.batch };
    let mut cursor = 0usize;
    loop {
        let take = step.min(mine.len()).max(1);
        let from = next.fetch_add(take, Ordering::Relaxed);
        if from >= plan.writes || mine.is_empty() {
            break;
        }
        let n = take.min(plan.writes - from);
        let entries = (cursor..cursor + n).map(|i| {
            let (id, r) = mine[i % mine.len()];
            ("Observation", id.as_str(), r)
        });
        if plan.single {
            for (t, id, r) in entries {
                put_one(http, base, t, id, r, versions).await;
            }
        } else {
            post_batch(http, base, entries, Some(versions)).await;
        }
        cursor += n;
    }
}

async fn put_one(http: &reqwest::Client, base: &str, t: &str, id: &str, r: &Value, versions: &Versions) {
    let mut req =
        http.put(format!("{base}/{t}/{id}")).header("Content-Type", "application/fhir+json").header("Prefer", PREFER);
    if let Some(v) = versions.version(id) {
        req = req.header("If-Match", format!("W/\"{v}\""));
    }
    let resp = req.body(serde_json::to_vec(r).unwrap_or_default()).send().await.unwrap_or_else(|e| panic!("PUT: {e}"));
    assert!(resp.status().is_success(), "PUT {t}: HTTP {}", resp.status());
    let etag = resp.headers().get("etag").and_then(|v| v.to_str().ok());
    versions.record(id, etag);
}

/// What the connector asks of the server on a write: only the status and the new version back.
const PREFER: &str = "return=minimal";

/// The version last written of each Observation: later writes of it carry `If-Match`, as the
/// connector's do (the server checks the version before it writes).
#[derive(Default)]
struct Versions(Mutex<HashMap<String, String>>);

impl Versions {
    fn version(&self, id: &str) -> Option<String> {
        self.0.lock().ok()?.get(id).cloned()
    }

    fn record(&self, id: &str, etag: Option<&str>) {
        if let (Some(v), Ok(mut map)) = (etag.map(parse_etag), self.0.lock()) {
            map.insert(id.to_string(), v);
        }
    }
}

/// PUTs in one `batch` Bundle, as the connector's writer sends them; every entry must succeed.
async fn post_batch<'a>(
    http: &reqwest::Client,
    base: &str,
    entries: impl Iterator<Item = (&'a str, &'a str, &'a Value)>,
    versions: Option<&Versions>,
) {
    let mut ids: Vec<&str> = Vec::new();
    let entries: Vec<Value> = entries
        .map(|(t, id, r)| {
            ids.push(id);
            let mut request = json!({"method": "PUT", "url": format!("{t}/{id}")});
            if let Some(v) = versions.and_then(|vs| vs.version(id)) {
                request["ifMatch"] = json!(format!("W/\"{v}\""));
            }
            json!({"fullUrl": format!("{base}/{t}/{id}"), "resource": r, "request": request})
        })
        .collect();
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": entries});
    let resp = http
        .post(format!("{base}/"))
        .header("Content-Type", "application/fhir+json")
        .header("Accept", "application/fhir+json")
        .header("Prefer", PREFER)
        .body(serde_json::to_vec(&bundle).unwrap_or_default())
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST batch: {e}"));
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or_default();
    assert!(status.is_success(), "POST batch: HTTP {status}: {body}");
    let answers = body["entry"].as_array().cloned().unwrap_or_default();
    assert_eq!(answers.len(), ids.len(), "batch answered {} entries for {}", answers.len(), ids.len());
    for (id, e) in ids.into_iter().zip(answers) {
        let s = e["response"]["status"].as_str().unwrap_or("");
        assert!(s.starts_with('2'), "batch entry answered {s}: {}", e["response"]);
        if let Some(vs) = versions {
            vs.record(id, e["response"]["etag"].as_str());
        }
    }
}
