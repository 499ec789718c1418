//! The Event Hubs source (`source.kind = "eventhubs"`) against the repo's Event Hubs-shaped AMQP 1.0
//! test peer (tests/eventhubs/peer.mjs, proven against Microsoft's `@azure/event-hubs` by
//! scripts/setup.sh), the real PostgreSQL checkpoint store and the real FHIR server.

mod common;

use azure_core_amqp::message::{AmqpAnnotationKey, AmqpAnnotations, AmqpApplicationProperties, AmqpMessageBody};
use azure_core_amqp::{AmqpMessage, AmqpSimpleValue, AmqpSymbol, AmqpTimestamp, AmqpValue};
use azure_messaging_eventhubs::{OpenReceiverOptions, StartLocation, StartPosition};
use common::services::{self, Connector, Fhir, Setup};
use common::vitals::*;
use futures_util::StreamExt;
use iomt_connector::config::EventHubs;
use iomt_connector::source::eventhubs::{self, HubPublisher};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

// The tests run on tokio's current-thread runtime, as the connector's own sources and the
// `publish`/`simulate` commands do: on the multi-thread runtime the SDK's producer (fe2o3-amqp 0.16)
// stopped sending mid-stream, now and then, with every thread parked.

/// One test at a time: each runs its own peer and several connectors.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const PARTITIONS: usize = 4;

fn pg_url() -> String {
    std::env::var("IOMT_TEST_PG_URL").unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into())
}

/// The test peer, on its own port and data directory (events survive its restart).
struct Peer {
    port: u16,
    data: PathBuf,
    child: Option<Child>,
}

impl Peer {
    async fn start() -> Peer {
        Peer::start_at(free_port()).await
    }

    async fn start_at(port: u16) -> Peer {
        let data = std::env::temp_dir().join(format!("iomt-eh-peer-{port}"));
        let mut p = Peer { port, data, child: None };
        p.restart().await;
        p
    }

    async fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
        let mut child = Command::new("node")
            .arg(services::repo_path("tests/eventhubs/peer.mjs"))
            .args(["--port", &self.port.to_string(), "--partitions", &PARTITIONS.to_string()])
            .arg("--data")
            .arg(&self.data)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the Event Hubs test peer (node): {e}; run scripts/setup.sh"));
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("peer stdout"));
        let mut lines = BufReader::new(stdout).lines();
        let listening = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(l)) = lines.next_line().await {
                if l.contains("listening") {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(listening, Ok(true), "the Event Hubs test peer did not start listening on port {}", self.port);
        // Keep reading its stdout so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
    }

    fn connection_string(&self) -> String {
        format!("Endpoint=sb://127.0.0.1:{};SharedAccessKeyName=test;SharedAccessKey=c2VjcmV0", self.port)
    }

    fn settings(&self) -> EventHubs {
        EventHubs {
            connection_string: self.connection_string(),
            custom_endpoint: format!("amqp://127.0.0.1:{}", self.port),
            ..Default::default()
        }
    }

    /// The connector's environment for reading `hub` with this peer.
    fn env(&self, hub: &str, instance: &str) -> Vec<(&'static str, String)> {
        vec![
            ("IOMT_SOURCE__KIND", "eventhubs".into()),
            ("IOMT_EVENTHUBS__CONNECTION_STRING", self.connection_string()),
            ("IOMT_EVENTHUBS__CUSTOM_ENDPOINT", format!("amqp://127.0.0.1:{}", self.port)),
            ("IOMT_EVENTHUBS__HUB", hub.into()),
            ("IOMT_EVENTHUBS__DEAD_LETTER_HUB", format!("{hub}-dead-letters")),
            ("IOMT_EVENTHUBS__CHECKPOINT_POSTGRES_URL", pg_url()),
            ("IOMT_EVENTHUBS__INSTANCE_ID", instance.into()),
            ("IOMT_EVENTHUBS__BALANCE_INTERVAL_SECS", "1".into()),
            ("IOMT_EVENTHUBS__OWNERSHIP_EXPIRY_SECS", "6".into()),
            ("IOMT_EVENTHUBS__CHECKPOINT_INTERVAL_MS", "200".into()),
        ]
    }

    /// Events enqueued per partition (last sequence number + 1), asked of the peer like the service.
    async fn enqueued(&self, hub: &str) -> Vec<i64> {
        let c = eventhubs::consumer(&self.settings(), hub).await.unwrap_or_else(|e| panic!("{e}"));
        let mut out = Vec::new();
        for p in 0..PARTITIONS {
            let props = c.get_partition_properties(&p.to_string()).await.unwrap_or_else(|e| panic!("{e}"));
            out.push(props.last_enqueued_sequence_number + 1);
        }
        out
    }

    /// Every event of `hub` (all partitions), read from the start.
    async fn read_all(&self, hub: &str, expect: usize) -> Vec<AmqpMessage> {
        let c = eventhubs::consumer(&self.settings(), hub).await.unwrap_or_else(|e| panic!("{e}"));
        let props = c.get_eventhub_properties().await.unwrap_or_else(|e| panic!("{e}"));
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        for p in props.partition_ids {
            let o = OpenReceiverOptions {
                start_position: Some(StartPosition { location: StartLocation::Earliest, inclusive: false }),
                ..Default::default()
            };
            let r = c.open_receiver_on_partition(p, Some(o)).await.unwrap_or_else(|e| panic!("{e}"));
            let mut events = Box::pin(r.stream_events());
            while got.len() < expect && Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_secs(3), events.next()).await {
                    Ok(Some(Ok(e))) => got.push(e.raw_amqp_message().clone()),
                    _ => break,
                }
            }
        }
        got
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The checkpoints the connectors wrote for `hub`, by partition (sequence numbers).
async fn checkpoints(namespace: &str, hub: &str) -> HashMap<String, i64> {
    let (client, conn) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {}: {e}; run scripts/setup.sh", pg_url()));
    tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT partition_id, sequence_number FROM iomt_eventhubs_checkpoint WHERE namespace = $1 AND hub = $2",
            &[&namespace, &hub],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// Who owns each partition of `hub`, by the ownership table ('' once released).
async fn ownership(namespace: &str, hub: &str) -> HashMap<String, String> {
    let (client, conn) =
        tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls).await.unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT partition_id, owner_id FROM iomt_eventhubs_ownership WHERE namespace = $1 AND hub = $2",
            &[&namespace, &hub],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// Every partition checkpointed at its last event.
/// What every test here starts with: the one-at-a-time lock, the FHIR server checked, its own
/// peer, and a unique run name (also the hub's) with its identifier system.
async fn begin(prefix: &str) -> (tokio::sync::MutexGuard<'static, ()>, Peer, String, String) {
    let one = ONE_AT_A_TIME.lock().await;
    services::require_fhir().await;
    let peer = Peer::start().await;
    let run = services::unique(prefix);
    let system = format!("urn:iomt-test:{run}");
    (one, peer, run, system)
}

async fn until_checkpointed(peer: &Peer, hub: &str, timeout: Duration) {
    until_checkpointed_in(&format!("127.0.0.1:{}", peer.port), peer, hub, timeout).await
}

/// `until_checkpointed` for a connector that knows the peer as `namespace`.
async fn until_checkpointed_in(namespace: &str, peer: &Peer, hub: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let enqueued = peer.enqueued(hub).await;
        let cps = checkpoints(namespace, hub).await;
        let done =
            enqueued.iter().enumerate().all(|(p, n)| *n == 0 || cps.get(&p.to_string()).is_some_and(|s| s + 1 == *n));
        if done {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not every partition checkpointed at its end: enqueued {enqueued:?}, checkpoints {cps:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn send(peer: &Peer, hub: &str, msgs: &[Vec<u8>]) {
    let mut p = HubPublisher::connect(&peer.settings(), hub, 200).await.unwrap_or_else(|e| panic!("{e}"));
    for m in msgs {
        let v: Value = serde_json::from_slice(m).unwrap_or_default();
        p.send(m, v["deviceId"].as_str()).await.unwrap_or_else(|e| panic!("{e}"));
    }
    p.flush().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.confirmed as usize, msgs.len(), "the peer accepted every event");
}

async fn connector(peer: &Peer, hub: &str, instance: &str, setup: &Setup<'_>) -> Connector {
    let mut env = Connector::env_for(setup);
    env.extend(peer.env(hub, instance).into_iter().map(|(k, v)| (k.to_string(), v)));
    Connector::start_env(env).await
}

async fn read(c: &Connector) -> f64 {
    c.metric("iomt_messages_received_total").await
}

async fn owned(c: &Connector) -> f64 {
    c.metric("iomt_eventhubs_partitions_owned").await
}

async fn until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn two_instances_share_a_four_partition_hub_a_sigkilled_ones_partitions_are_taken_over_and_checkpoints_resume() {
    let (_one, mut peer, run, system) = begin("ehub").await;
    let hub = run.clone();
    let setup = Setup::new("unused", "Create", &system);
    // 20 devices x 3 vitals x 30 readings, the device id as partition key.
    let msgs = bodies(&run, 20, 30, &[Vital::HeartRate, Vital::Spo2, Vital::BloodPressure]);
    let (first, rest) = msgs.split_at(msgs.len() / 3);
    let (second, third) = rest.split_at(rest.len() / 2);

    let a = connector(&peer, &hub, "instance-a", &setup).await;
    let mut b = connector(&peer, &hub, "instance-b", &setup).await;
    until("the two instances split the four partitions", Duration::from_secs(60), || async {
        owned(&a).await == 2.0 && owned(&b).await == 2.0
    })
    .await;
    let (_, actors) = a.get("/actors").await;
    let actors: Value = serde_json::from_str(&actors).unwrap_or_default();
    assert_eq!(actors["source"]["kind"], "eventhubs", "{actors}");
    assert_eq!(actors["source"]["partitions"].as_array().map(Vec::len), Some(2), "{actors}");

    send(&peer, &hub, first).await;
    until_checkpointed(&peer, &hub, Duration::from_secs(120)).await;
    let (ra, rb) = (read(&a).await, read(&b).await);
    println!("first third: instance a read {ra}, instance b read {rb} of {}", first.len());
    assert_eq!(ra + rb, first.len() as f64, "each event read once");
    assert!(ra > 0.0 && rb > 0.0, "both instances read events");

    // SIGKILL b while the second third streams in; a takes its partitions once their ownership expires.
    let sending = send(&peer, &hub, second);
    let kill = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.signal("KILL");
        b.wait(Duration::from_secs(10)).await;
    };
    tokio::join!(sending, kill);
    let killed = Instant::now();
    until("a owns all four partitions", Duration::from_secs(60), || async { owned(&a).await == 4.0 }).await;
    println!("instance b SIGKILLed: a owned its partitions {:.1} s later", killed.elapsed().as_secs_f64());
    until_checkpointed(&peer, &hub, Duration::from_secs(120)).await;

    // Both stop; the last third arrives while nothing reads; both start again and read only it.
    a.signal("TERM");
    let mut a = a;
    assert_eq!(a.wait(Duration::from_secs(60)).await, Some(0), "{}", a.log());
    send(&peer, &hub, third).await;
    peer.restart().await;
    let a2 = connector(&peer, &hub, "instance-a", &setup).await;
    let b2 = connector(&peer, &hub, "instance-b", &setup).await;
    until_checkpointed(&peer, &hub, Duration::from_secs(120)).await;
    let (ra, rb) = (read(&a2).await, read(&b2).await);
    println!("after a restart of both (and of the peer): read {ra} + {rb}, the last third is {}", third.len());
    assert_eq!(ra + rb, third.len() as f64, "the checkpoints resume after the last event persisted");
    assert_eq!(a2.metric("iomt_dead_lettered_total").await, 0.0);
    assert_converged(&Fhir::new(), &run, 20, &uninterrupted(&msgs, &system)).await;

    // A clean stop gives the partitions up at once: the other instance takes them without
    // waiting for the ownership to expire (6 s here).
    let (mut a2, b2) = (a2, b2);
    a2.signal("TERM");
    assert_eq!(a2.wait(Duration::from_secs(30)).await, Some(0), "{}", a2.log());
    let stopped = Instant::now();
    let owners = ownership(&format!("127.0.0.1:{}", peer.port), &hub).await;
    assert!(!owners.values().any(|o| o == "instance-a"), "a released its partitions: {owners:?}");
    until("b owns all four partitions", Duration::from_secs(30), || async { owned(&b2).await == 4.0 }).await;
    println!("instance a stopped cleanly: b owned its partitions {:.1} s later", stopped.elapsed().as_secs_f64());
}

/// A partition that comes back to an instance that lost it is read again. The SDK's connection
/// keeps a receiver that was dropped without being closed; a receiver opened later on the same
/// partition found that stale, stolen link and failed, and the recoveries that followed stalled
/// every partition on the connection.
#[tokio::test]
async fn a_partition_taken_from_an_instance_and_given_back_is_read_again_by_it() {
    let (_one, peer, run, system) = begin("ehback").await;
    let hub = run.clone();
    let setup = Setup::new("unused", "Create", &system);
    // 40 devices (the partition key), so that every partition gets events in each half.
    let msgs = bodies(&run, 40, 4, &[Vital::HeartRate]);
    let (before, after) = msgs.split_at(msgs.len() / 2);

    let a = connector(&peer, &hub, "instance-a", &setup).await;
    until("a alone owns all four partitions", Duration::from_secs(30), || async { owned(&a).await == 4.0 }).await;
    let mut b = connector(&peer, &hub, "instance-b", &setup).await;
    until("b took two of them from a", Duration::from_secs(30), || async {
        owned(&a).await == 2.0 && owned(&b).await == 2.0
    })
    .await;
    send(&peer, &hub, before).await;
    until_checkpointed(&peer, &hub, Duration::from_secs(60)).await;

    // b stops cleanly and releases its two; a claims them back and reads what arrives on them.
    b.signal("TERM");
    assert_eq!(b.wait(Duration::from_secs(30)).await, Some(0), "{}", b.log());
    until("a owns all four partitions again", Duration::from_secs(30), || async { owned(&a).await == 4.0 }).await;
    let enqueued = peer.enqueued(&hub).await;
    send(&peer, &hub, after).await;
    let now = peer.enqueued(&hub).await;
    assert!(
        now.iter().zip(&enqueued).all(|(n, e)| n > e),
        "every partition, the two given back included, has new events: {enqueued:?} -> {now:?}"
    );
    until_checkpointed(&peer, &hub, Duration::from_secs(60)).await;
    assert_eq!(a.metric("iomt_dead_lettered_total").await, 0.0);
}

/// An event as IoT Hub routes it: the device id and enqueued time as message annotations, the
/// creation time as an application property.
fn iot_hub_event(device: &str, heartrate: &str) -> AmqpMessage {
    let mut app = AmqpApplicationProperties::new();
    app.0.insert("iothub-creation-time-utc".into(), AmqpSimpleValue::String("2019-01-30T22:45:02.6073744Z".into()));
    app.0.insert("tz".into(), AmqpSimpleValue::String("America/Los_Angeles".into()));
    let mut ann = AmqpAnnotations::new();
    let sym = |s: &str| AmqpAnnotationKey::Symbol(AmqpSymbol(s.into()));
    ann.0.insert(sym("iothub-connection-device-id"), AmqpValue::String(device.into()));
    let enqueued = std::time::SystemTime::UNIX_EPOCH + Duration::from_millis(1_549_061_161_875);
    ann.0.insert(sym("iothub-enqueuedtime"), AmqpValue::TimeStamp(AmqpTimestamp(Some(enqueued))));
    AmqpMessage {
        body: AmqpMessageBody::Binary(vec![json!({"heartrate": heartrate}).to_string().into_bytes()]),
        application_properties: Some(app),
        message_annotations: Some(ann),
        ..Default::default()
    }
}

#[tokio::test]
async fn an_iot_hub_routed_event_normalizes_with_an_unchanged_iot_template_and_bad_events_go_to_the_dead_letter_hub() {
    let (_one, peer, run, system) = begin("iothub").await;
    let hub = run.clone();
    let device = format!("{run}-ev-d795");
    // Lookup mode: the Device and its Patient exist, as an IoT Hub deployment's would.
    let fhir = Fhir::new();
    let (p, d) = (format!("{run}-pat"), format!("{run}-dev"));
    fhir.put(&format!("Patient/{p}"), &json!({"resourceType": "Patient", "id": p})).await;
    fhir.put(
        &format!("Device/{d}"),
        &json!({"resourceType": "Device", "id": d, "identifier": [{"system": system, "value": device}],
                "patient": {"reference": format!("Patient/{p}")}}),
    )
    .await;

    // The reference's own IotJsonPathContent template, unchanged (read from the conformance
    // vectors); the sample FHIR mapping's heartrate (hourly SampledData of "hr").
    let mut setup = Setup::new("unused", "Lookup", &system);
    setup.device_mapping = common::conformance_dir().join("iothub-iotjsonpath-basic/device-template.json");
    setup.fhir_mapping = services::repo_path("mappings/fhirmapping.json");
    let c = connector(&peer, &hub, "iot", &setup).await;

    let producer = eventhubs::producer(&peer.settings(), &hub).await.unwrap_or_else(|e| panic!("{e}"));
    producer.send_message(iot_hub_event(&device, "203"), None).await.unwrap_or_else(|e| panic!("{e}"));
    let mut not_json = iot_hub_event(&device, "0");
    not_json.body = AmqpMessageBody::Binary(vec![b"{not json".to_vec()]);
    producer.send_message(not_json, None).await.unwrap_or_else(|e| panic!("{e}"));
    let unknown = iot_hub_event(&format!("{run}-unknown"), "99");
    producer.send_message(unknown, None).await.unwrap_or_else(|e| panic!("{e}"));

    until_checkpointed(&peer, &hub, Duration::from_secs(60)).await;
    let obs = fhir.search(&format!("Observation?subject=Patient/{p}")).await;
    assert_eq!(obs.len(), 1, "{obs:?}");
    // The reading's time is iothub-creation-time-utc (22:45:02): in the 22:00 hourly window.
    assert!(
        obs[0]["effectivePeriod"]["start"].as_str().unwrap_or_default().starts_with("2019-01-30T22:00:00"),
        "{}",
        obs[0]
    );
    let data = obs[0]["valueSampledData"]["data"].as_str().unwrap_or_default().to_string();
    assert_eq!(data.split(' ').filter(|v| *v != "E").collect::<Vec<_>>(), vec!["203"], "{}", obs[0]);

    let dead = peer.read_all(&format!("{hub}-dead-letters"), 2).await;
    let mut kinds: Vec<String> = dead
        .iter()
        .filter_map(|m| match m.application_properties.as_ref()?.0.get("x-iomt-error-kind")? {
            AmqpSimpleValue::String(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    kinds.sort();
    assert_eq!(kinds, vec!["identity-not-found".to_string(), "invalid-json".to_string()], "{dead:?}");
    assert_eq!(c.metric("iomt_dead_lettered_total{kind=\"invalid-json\"}").await, 1.0);
}

/// A Microsoft Entra token endpoint stand-in: answers every client-credentials request with a
/// token and keeps the request bodies.
fn token_endpoint() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    stand_in(r#"{"token_type":"Bearer","expires_in":3600,"access_token":"entra-test-token"}"#.into())
}

/// A token endpoint stand-in: answers every request with `body` and keeps the requests.
fn stand_in(body: String) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let url = format!("http://{}", listener.local_addr().unwrap_or_else(|e| panic!("{e}")));
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = vec![0u8; 16384];
            let n = s.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            if let Ok(mut l) = log.lock() {
                l.push(req);
            }
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, seen)
}

#[tokio::test]
async fn entra_client_credentials_sign_in_through_the_tenants_token_endpoint() {
    let (_one, peer, run, system) = begin("entra").await;
    let hub = run.clone();
    let (authority, requests) = token_endpoint();
    let setup = Setup::new("unused", "Create", &system);
    let mut env = Connector::env_for(&setup);
    env.extend(peer.env(&hub, "entra").into_iter().map(|(k, v)| (k.to_string(), v)));
    env.retain(|(k, _)| k != "IOMT_EVENTHUBS__CONNECTION_STRING");
    for (k, v) in [
        ("IOMT_EVENTHUBS__AUTH", "entra".to_string()),
        ("IOMT_EVENTHUBS__NAMESPACE", format!("127.0.0.1:{}", peer.port)),
        ("IOMT_EVENTHUBS__TENANT_ID", "tenant-1".into()),
        ("IOMT_EVENTHUBS__CLIENT_ID", "app-1".into()),
        ("IOMT_EVENTHUBS__CLIENT_SECRET", "s3cret".into()),
        ("IOMT_EVENTHUBS__AUTHORITY_HOST", authority),
    ] {
        env.push((k.to_string(), v));
    }
    let c = Connector::start_env(env).await;
    let msgs = bodies(&run, 2, 3, &[Vital::HeartRate]);
    send(&peer, &hub, &msgs).await;
    until("the events are read and acked", Duration::from_secs(60), || async {
        c.metric("iomt_messages_acked_total").await == msgs.len() as f64
    })
    .await;
    let requests = requests.lock().map(|r| r.clone()).unwrap_or_default();
    let first = requests.first().cloned().unwrap_or_default();
    assert!(first.starts_with("POST /tenant-1/oauth2/v2.0/token "), "{first}");
    for part in
        ["grant_type=client_credentials", "client_id=app-1", "client_secret=s3cret", "scope=", "eventhubs.azure.net"]
    {
        assert!(first.contains(part), "{part} in {first}");
    }
    assert_converged(&Fhir::new(), &run, 2, &uninterrupted(&msgs, &system)).await;
}

/// An application property of an event, as text.
fn property(m: &AmqpMessage, key: &str) -> Option<String> {
    match m.application_properties.as_ref()?.0.get(key)? {
        AmqpSimpleValue::String(s) => Some(s.clone()),
        AmqpSimpleValue::Long(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The count on `kind`'s line of `dead-letters list` (0 when it has none).
fn listed(out: &str, kind: &str) -> usize {
    out.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(kind)).then(|| words.next()?.parse().ok()).flatten()
        })
        .next()
        .unwrap_or(0)
}

/// The bodies of `events` as text, sorted.
fn event_bodies(events: &[AmqpMessage]) -> Vec<String> {
    let mut out: Vec<String> = events
        .iter()
        .map(|m| match &m.body {
            AmqpMessageBody::Binary(parts) => String::from_utf8_lossy(&parts.concat()).into_owned(),
            other => format!("{other:?}"),
        })
        .collect();
    out.sort();
    out
}

/// How many dead letters `dead-letters redrive` recorded as sent back, for a dead-letter hub.
async fn redriven_rows(namespace: &str, dead_letter_hub: &str) -> i64 {
    let (client, conn) =
        tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls).await.unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT count(*) FROM iomt_eventhubs_redriven WHERE namespace = $1 AND hub = $2",
            &[&namespace, &dead_letter_hub],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    row.get(0)
}

/// `dead-letters list|redrive` on the dead-letter hub. A broken device mapping dead-letters every
/// heart-rate reading (missing-value) and two events are not JSON (invalid-json). Once the mapping
/// is fixed, a redrive sends the readings back to the hub, each to the partition it came from, with
/// its body and application properties and without the dead-letter ones; a connector writes them.
/// A hub keeps its events, so what was redriven is recorded: a second list shows only what still
/// fails and a second redrive sends nothing.
#[tokio::test]
async fn the_dead_letter_hub_is_listed_and_what_now_passes_is_redriven_once() {
    let (_one, peer, run, system) = begin("ehdlq").await;
    let hub = run.clone();
    let dead_hub = format!("{hub}-dead-letters");
    let namespace = format!("127.0.0.1:{}", peer.port);
    let msgs = bodies(&run, 3, 10, &[Vital::HeartRate]);
    let total = msgs.len() + 2;

    let from = dead_letter_all(&peer, &hub, &run, &system, &msgs).await;

    let fixed = Setup::new("unused", "Create", &system);
    let mut env = Connector::env_for(&fixed);
    env.extend(peer.env(&hub, "fixed").into_iter().map(|(k, v)| (k.to_string(), v)));
    let mut unnamed = env.clone();
    unnamed.push(("IOMT_EVENTHUBS__DEAD_LETTER_HUB".into(), String::new()));
    let (code, out) = services::dead_letters(&unnamed, &["list"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("eventhubs.dead_letter_hub is not set"), "the error names the setting: {out}");

    let started = Instant::now();
    let (code, out) = services::dead_letters(&env, &["list"]);
    println!("{out}list: {:.2} s", started.elapsed().as_secs_f64());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("{dead_hub}: {total} message(s)")), "{out}");
    assert_eq!((listed(&out, "missing-value"), listed(&out, "invalid-json")), (msgs.len(), 2), "{out}");
    assert!(out.contains("timestampExpression"), "the first error says what failed: {out}");

    let (code, out) = services::dead_letters(&env, &["redrive", "--dry-run"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("would now pass the mappings: {}", msgs.len())), "{out}");
    assert!(out.contains("would still fail: 2 invalid-json"), "{out}");
    assert!(out.contains("dry run: nothing moved"), "{out}");

    let enqueued = peer.enqueued(&hub).await;
    let mut c2 = connector(&peer, &hub, "fixed", &fixed).await;
    let started = Instant::now();
    let (code, out) = services::dead_letters(&env, &["redrive"]);
    let took = started.elapsed();
    println!("{out}");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("moved {} back", msgs.len())), "{out}");
    c2.wait_acked(msgs.len() as f64, Duration::from_secs(60)).await;
    let now = peer.enqueued(&hub).await;
    let sent: Vec<i64> = now.iter().zip(&enqueued).map(|(n, e)| n - e).collect();
    println!("redrive: {} events sent back in {:.2} s, by partition {sent:?}", msgs.len(), took.as_secs_f64());
    assert_eq!(sent, from, "each reading went back to the partition it was read from");
    assert_eq!(c2.metric("iomt_dead_lettered_total").await, 0.0);
    assert_eq!(redriven_rows(&namespace, &dead_hub).await, msgs.len() as i64);
    assert_converged(&Fhir::new(), &run, 3, &uninterrupted(&msgs, &system)).await;

    let (code, out) = services::dead_letters(&env, &["list"]);
    println!("{out}");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("{dead_hub}: 2 message(s)")), "{out}");
    assert_eq!((listed(&out, "missing-value"), listed(&out, "invalid-json")), (0, 2), "{out}");
    let (code, out) = services::dead_letters(&env, &["redrive"]);
    println!("{out}");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 message(s), 2 selected") && out.contains("moved 0 back"), "{out}");
    assert_eq!(peer.enqueued(&hub).await, now, "a second redrive sends nothing");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(c2.metric("iomt_messages_acked_total").await, msgs.len() as f64);
    c2.signal("TERM");
    assert_eq!(c2.wait(Duration::from_secs(60)).await, Some(0), "{}", c2.log());
    assert_sent_back_as_they_came(&peer, &hub, &msgs).await;
}

/// Runs a connector with a broken device mapping over `msgs` and two events that are not JSON,
/// until all are dead-lettered; how many readings were read from each partition.
async fn dead_letter_all(peer: &Peer, hub: &str, run: &str, system: &str, msgs: &[Vec<u8>]) -> Vec<i64> {
    let mut broken = Setup::new("unused", "Create", system);
    broken.device_mapping = services::broken_device_mapping(run);
    let mut c = connector(peer, hub, "broken", &broken).await;
    send(peer, hub, msgs).await;
    let producer = eventhubs::producer(&peer.settings(), hub).await.unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..2 {
        let not_json = AmqpMessage { body: AmqpMessageBody::Binary(vec![b"{not json".to_vec()]), ..Default::default() };
        producer.send_message(not_json, None).await.unwrap_or_else(|e| panic!("{e}"));
    }
    until_checkpointed(peer, hub, Duration::from_secs(60)).await;
    c.signal("TERM");
    assert_eq!(c.wait(Duration::from_secs(60)).await, Some(0), "{}", c.log());
    let dead = peer.read_all(&format!("{hub}-dead-letters"), msgs.len() + 2).await;
    assert_eq!(dead.len(), msgs.len() + 2, "every event dead-lettered");
    let mut from = vec![0i64; PARTITIONS];
    for m in dead.iter().filter(|m| property(m, "x-iomt-error-kind").as_deref() == Some("missing-value")) {
        let p: usize = property(m, "x-iomt-source-partition").and_then(|p| p.parse().ok()).unwrap_or(PARTITIONS);
        assert!(p < PARTITIONS, "x-iomt-source-partition of {m:?}");
        from[p] += 1;
    }
    from
}

/// In the hub (read once no connector holds its partitions): every reading twice, as sent and as
/// redriven, and none with a dead-letter property.
async fn assert_sent_back_as_they_came(peer: &Peer, hub: &str, msgs: &[Vec<u8>]) {
    let events = peer.read_all(hub, 2 * msgs.len() + 2).await;
    let readings: Vec<AmqpMessage> = events.into_iter().filter(|m| property(m, "x-iomt-sent-at").is_some()).collect();
    let mut twice: Vec<String> = msgs.iter().chain(msgs).map(|b| String::from_utf8_lossy(b).into_owned()).collect();
    twice.sort();
    assert_eq!(event_bodies(&readings), twice, "the original bodies");
    for m in &readings {
        for k in ["x-iomt-error-kind", "x-iomt-error", "x-iomt-source-hub", "x-iomt-source-partition"] {
            assert_eq!(property(m, k), None, "{k} on a redriven event");
        }
    }
}

/// The namespace scripts/setup.sh's stunnel answers for, with TLS on 5671 (`/etc/hosts` points it at
/// 127.0.0.2), and the port it forwards to, where the test starts its peer.
const TLS_NAMESPACE: &str = "iomt-test.servicebus.windows.net";
const TLS_PEER_PORT: u16 = 5680;

/// The connector reaches the hub as it reaches a real one: a namespace name in the connection string,
/// no custom endpoint, AMQP over TLS on 5671 with the certificate checked against that name. The
/// SDK takes no CA setting; its verifier reads `SSL_CERT_FILE` (docs/tls.md), which points at the
/// test CA for this connector only.
#[tokio::test]
async fn the_connector_reads_a_hub_reached_as_a_namespace_over_tls_and_checkpoints() {
    let one = ONE_AT_A_TIME.lock().await;
    services::require_fhir().await;
    let ca = services::tls_dir().join("ca.pem");
    assert!(ca.is_file(), "{} is missing: run scripts/setup.sh (it makes the test CA)", ca.display());
    assert!(
        std::net::TcpStream::connect((TLS_NAMESPACE, 5671)).is_ok(),
        "nothing answers at {TLS_NAMESPACE}:5671 (stunnel on 127.0.0.2 and its /etc/hosts line): run scripts/setup.sh"
    );
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", TLS_PEER_PORT)).is_ok(),
        "127.0.0.1:{TLS_PEER_PORT}, where stunnel forwards, is taken by another process: the test peer must listen there"
    );
    let peer = Peer::start_at(TLS_PEER_PORT).await;
    let run = services::unique("ehtls");
    let system = format!("urn:iomt-test:{run}");
    let hub = run.clone();
    let msgs = bodies(&run, 8, 3, &[Vital::HeartRate, Vital::Spo2]);
    // The test's own reads and writes go to the peer directly; only the connector uses TLS.
    send(&peer, &hub, &msgs).await;

    let setup = Setup::new("unused", "Create", &system);
    let mut env = Connector::env_for(&setup);
    env.extend(peer.env(&hub, "instance-tls").into_iter().map(|(k, v)| (k.to_string(), v)));
    let cs = format!("Endpoint=sb://{TLS_NAMESPACE}/;SharedAccessKeyName=test;SharedAccessKey=c2VjcmV0");
    env.push(("IOMT_EVENTHUBS__CONNECTION_STRING".into(), cs));
    env.push(("IOMT_EVENTHUBS__CUSTOM_ENDPOINT".into(), String::new()));
    env.push(("SSL_CERT_FILE".into(), ca.display().to_string()));
    let c = Connector::start_env(env.clone()).await;
    until_checkpointed_in(TLS_NAMESPACE, &peer, &hub, Duration::from_secs(120)).await;
    assert_eq!(read(&c).await, msgs.len() as f64, "each event read once, over TLS");
    assert_eq!(c.metric("iomt_dead_lettered_total").await, 0.0);
    assert_converged(&Fhir::new(), &run, 8, &uninterrupted(&msgs, &system)).await;
    let mut c = c;
    c.signal("TERM");
    assert_eq!(c.wait(Duration::from_secs(30)).await, Some(0), "{}", c.log());

    // Without the test CA the certificate is refused: the connection above was verified TLS.
    env.retain(|(k, _)| k != "SSL_CERT_FILE");
    let refused = Connector::spawn_env(env);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !refused.log().contains("UnknownIssuer; the namespace's TLS certificate is not trusted") {
        assert!(
            Instant::now() < deadline,
            "a connector without the test CA did not report an untrusted certificate in 60 s; log:\n{}",
            services::tail(&refused.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(read(&refused).await, 0.0, "nothing read through an untrusted connection");
    drop(one);
}

// ------------------------------------------------------------------ the Blob checkpoint store
// Azurite, started by scripts/setup.sh (setup_azurite): Shared Key over HTTP on 10000, bearer
// tokens over HTTPS (the test CA's certificate) on 10100.

const AZURITE: &str = "127.0.0.1:10000";
const AZURITE_TLS: &str = "127.0.0.1:10100";
/// Azurite's well-known development account, as a connection string.
const AZURITE_STORAGE: &str = "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;";

fn require_azurite(addr: &str) {
    assert!(
        std::net::TcpStream::connect(addr).is_ok(),
        "Azurite is not answering on {addr}: run scripts/setup.sh (setup_azurite starts it)"
    );
}

/// A container name of the run's own (3-63 of a-z, 0-9 and single hyphens).
fn container_of(run: &str) -> String {
    let c: String = run.to_ascii_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    c.chars().take(63).collect::<String>().trim_matches('-').to_string()
}

/// The connector's environment for the Blob store: Microsoft's JS client sees the peer's namespace
/// as `127.0.0.1` (the host of `sb://127.0.0.1:PORT`), so the connector is told the same.
fn blob_env(peer: &Peer, hub: &str, instance: &str, container: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = peer.env(hub, instance).into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    env.retain(|(k, _)| k != "IOMT_EVENTHUBS__CHECKPOINT_POSTGRES_URL");
    for (k, v) in [
        ("IOMT_EVENTHUBS__CHECKPOINT_STORE", "blob"),
        ("IOMT_EVENTHUBS__BLOB_CONNECTION_STRING", AZURITE_STORAGE),
        ("IOMT_EVENTHUBS__BLOB_CONTAINER", container),
        ("IOMT_EVENTHUBS__NAMESPACE", "127.0.0.1"),
    ] {
        env.push((k.into(), v.into()));
    }
    env
}

/// What Microsoft's processor (tests/eventhubs/processor.mjs) listed and processed.
#[derive(Debug, serde::Deserialize)]
struct Processed {
    namespace: String,
    checkpoints: Vec<Value>,
    ownerships: Vec<Value>,
    events: Vec<Value>,
}

/// Runs Microsoft's processor over `hub` in `container`; `args` as processor.mjs takes them.
async fn microsoft_processor(peer: &Peer, hub: &str, container: &str, args: &[&str]) -> Processed {
    let out = Command::new("node")
        .arg(services::repo_path("tests/eventhubs/processor.mjs"))
        .args(["--port", &peer.port.to_string(), "--hub", hub, "--storage", AZURITE_STORAGE, "--container", container])
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run node: {e}; run scripts/setup.sh"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "processor.mjs failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("processor.mjs printed {stdout}: {e}"))
}

/// Sends `msgs` without a partition key: the peer deals them round robin over the partitions.
async fn send_round_robin(peer: &Peer, hub: &str, msgs: &[Vec<u8>]) {
    let mut p = HubPublisher::connect(&peer.settings(), hub, 200).await.unwrap_or_else(|e| panic!("{e}"));
    for m in msgs {
        p.send(m, None).await.unwrap_or_else(|e| panic!("{e}"));
    }
    p.flush().await.unwrap_or_else(|e| panic!("{e}"));
}

fn sequence_numbers(events: &[Value], partition: &str) -> Vec<i64> {
    events.iter().filter(|e| e["partition"] == partition).filter_map(|e| e["sequenceNumber"].as_i64()).collect()
}

/// Microsoft's processor and the connector, one consumer group and one container: each starts
/// where the other checkpointed, and `start_position` (here the time the connector starts: an
/// enqueued time, so that a partition claimed late still reads what came after it) applies only
/// to partitions neither checkpointed.
#[tokio::test]
async fn blob_checkpoints_are_shared_with_microsofts_event_processor_both_ways() {
    require_azurite(AZURITE);
    let (_one, peer, run, system) = begin("ehblob").await;
    let (hub, container) = (run.clone(), container_of(&run));
    send(&peer, &hub, &bodies(&run, 8, 5, &[Vital::HeartRate])).await;
    let n = peer.enqueued(&hub).await;
    assert!(n[0] >= 4 && n[1] >= 4, "the first two partitions hold 4 events each at least: {n:?}");

    // Microsoft's processor takes the first 4 events of partitions 0 and 1 and checkpoints them.
    let first = microsoft_processor(&peer, &hub, &container, &["--upto", "4", "--only", "0,1"]).await;
    assert_eq!(first.namespace, "127.0.0.1");
    assert_eq!(first.events.len(), 8, "{:?}", first.events);

    // The connector goes on after them on 0 and 1; 2 and 3 have no checkpoint: from now on.
    let setup = Setup::new("unused", "Create", &system);
    let mut env = Connector::env_for(&setup);
    env.extend(blob_env(&peer, &hub, "connector", &container));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    env.push(("IOMT_EVENTHUBS__START_POSITION".into(), now));
    let mut c = Connector::start_env(env).await;
    let after_microsoft = (n[0] - 4 + n[1] - 4) as f64;
    c.wait_acked(after_microsoft, Duration::from_secs(60)).await;
    let more = bodies(&format!("{run}-more"), 4, 5, &[Vital::HeartRate]);
    send_round_robin(&peer, &hub, &more).await;
    c.wait_acked(after_microsoft + more.len() as f64, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        read(&c).await,
        after_microsoft + more.len() as f64,
        "nothing read twice, nothing before start_position"
    );
    c.signal("TERM");
    assert_eq!(c.wait(Duration::from_secs(30)).await, Some(0), "{}", c.log());

    // Microsoft's processor lists the connector's checkpoints and released ownerships, and reads
    // only what came after them.
    let ends = peer.enqueued(&hub).await;
    let last = bodies(&format!("{run}-last"), 4, 3, &[Vital::HeartRate]);
    send_round_robin(&peer, &hub, &last).await;
    let second = microsoft_processor(&peer, &hub, &container, &[]).await;
    let mut listed: Vec<(String, i64)> = second
        .checkpoints
        .iter()
        .map(|c| (c["partitionId"].as_str().unwrap_or("").to_string(), c["sequenceNumber"].as_i64().unwrap_or(-1)))
        .collect();
    listed.sort();
    let expected: Vec<(String, i64)> = ends.iter().enumerate().map(|(p, e)| (p.to_string(), e - 1)).collect();
    assert_eq!(listed, expected, "the connector checkpointed every partition at its last event, as Microsoft reads it");
    assert_eq!(second.ownerships.len(), PARTITIONS, "{:?}", second.ownerships);
    assert!(second.ownerships.iter().all(|o| o["ownerId"] == ""), "released: {:?}", second.ownerships);
    assert_eq!(second.events.len(), last.len(), "{:?}", second.events);
    for (p, end) in ends.iter().enumerate() {
        let seqs = sequence_numbers(&second.events, &p.to_string());
        assert!(seqs.first().is_none_or(|s| s == end), "partition {p} resumed at {seqs:?}, after {}", end - 1);
    }
    println!(
        "Microsoft's processor read {} events, the connector the next {}, Microsoft's the last {}",
        first.events.len(),
        after_microsoft as usize + more.len(),
        second.events.len()
    );
}

/// A managed identity endpoint stand-in (IMDS or App Service's): every answer a token that both
/// the test peer and Azurite take. Azurite (`--oauth basic`) checks a token's issuer, audience
/// and times, not its signature.
fn identity_endpoint() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use base64::Engine;
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"aud": "https://storage.azure.com", "iss": "https://sts.windows.net/tenant-1/",
        "iat": now - 60, "nbf": now - 60, "exp": now + 3600, "oid": "managed-identity-test"});
    let jwt = format!("{}.{}.c2lnbmF0dXJl", b64(json!({"alg": "RS256", "typ": "JWT"})), b64(claims));
    let on = now + 3600;
    stand_in(format!(r#"{{"access_token":"{jwt}","expires_in":"3600","expires_on":"{on}","token_type":"Bearer"}}"#))
}

/// Whether a request of `requests` starts with `line` and carries `header` (lower-cased).
fn asked(requests: &[String], line: &str, header: &str) -> bool {
    requests.iter().any(|r| r.starts_with(line) && r.to_ascii_lowercase().contains(header))
}

/// `auth = "managed-identity"` signs in to the hub and to the Blob store, the latter Azurite over
/// HTTPS with the test CA (`blob_ca_file`) and bearer tokens: first through the instance metadata
/// endpoint (`Metadata: true`), then through App Service's `IDENTITY_ENDPOINT` and
/// `IDENTITY_HEADER`; the second connector starts after the first one's checkpoints.
#[tokio::test]
async fn managed_identity_signs_in_to_the_hub_and_to_the_blob_store_over_https() {
    require_azurite(AZURITE_TLS);
    let ca = services::tls_dir().join("ca.pem");
    assert!(ca.is_file(), "{} is missing: run scripts/setup.sh", ca.display());
    let (_one, peer, run, system) = begin("ehmsi").await;
    let hub = run.clone();
    let (endpoint, requests) = identity_endpoint();
    let setup = Setup::new("unused", "Create", &system);
    let mut env = Connector::env_for(&setup);
    env.extend(peer.env(&hub, "msi").into_iter().map(|(k, v)| (k.to_string(), v)));
    env.retain(|(k, _)| k != "IOMT_EVENTHUBS__CONNECTION_STRING" && k != "IOMT_EVENTHUBS__CHECKPOINT_POSTGRES_URL");
    for (k, v) in [
        ("IOMT_EVENTHUBS__AUTH", "managed-identity".to_string()),
        ("IOMT_EVENTHUBS__NAMESPACE", format!("127.0.0.1:{}", peer.port)),
        ("IOMT_EVENTHUBS__CHECKPOINT_STORE", "blob".into()),
        ("IOMT_EVENTHUBS__BLOB_URL", format!("https://{AZURITE_TLS}/devstoreaccount1")),
        ("IOMT_EVENTHUBS__BLOB_CONTAINER", container_of(&run)),
        ("IOMT_EVENTHUBS__BLOB_CA_FILE", ca.display().to_string()),
    ] {
        env.push((k.to_string(), v));
    }
    let mut imds = env.clone();
    imds.push(("IOMT_EVENTHUBS__IMDS_ENDPOINT".into(), format!("{endpoint}/metadata/identity/oauth2/token")));
    let msgs = bodies(&run, 2, 3, &[Vital::HeartRate]);
    send(&peer, &hub, &msgs).await;
    let mut c = Connector::start_env(imds).await;
    c.wait_acked(msgs.len() as f64, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.signal("TERM");
    assert_eq!(c.wait(Duration::from_secs(30)).await, Some(0), "{}", c.log());
    let seen = requests.lock().map(|mut r| std::mem::take(&mut *r)).unwrap_or_default();
    let imds_line = "GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2F";
    assert!(asked(&seen, &format!("{imds_line}eventhubs.azure.net "), "metadata: true"), "{seen:?}");
    assert!(asked(&seen, &format!("{imds_line}storage.azure.com "), "metadata: true"), "{seen:?}");

    // App Service's variables win over the instance metadata endpoint, here one nobody answers.
    let more = bodies(&format!("{run}-more"), 2, 2, &[Vital::HeartRate]);
    send(&peer, &hub, &more).await;
    let mut app = env.clone();
    app.push(("IOMT_EVENTHUBS__IMDS_ENDPOINT".into(), format!("http://127.0.0.1:{}/nobody", free_port())));
    app.push(("IDENTITY_ENDPOINT".into(), format!("{endpoint}/msi/token")));
    app.push(("IDENTITY_HEADER".into(), "header-secret".into()));
    let c2 = Connector::start_env(app).await;
    c2.wait_acked(more.len() as f64, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(read(&c2).await, more.len() as f64, "the second started after the first one's checkpoints");
    let seen = requests.lock().map(|r| r.clone()).unwrap_or_default();
    let app_line = "GET /msi/token?api-version=2019-08-01&resource=https%3A%2F%2F";
    assert!(asked(&seen, &format!("{app_line}eventhubs.azure.net "), "x-identity-header: header-secret"), "{seen:?}");
    assert!(asked(&seen, &format!("{app_line}storage.azure.com "), "x-identity-header: header-secret"), "{seen:?}");
}
