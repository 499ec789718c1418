//! Devices over MQTT: RabbitMQ's MQTT plugin (scripts/setup.sh: 127.0.0.1:1884, guest/guest) takes
//! QoS 1 publishes into `amq.topic`; the connector binds its queue there with `broker.mqtt_topics`
//! and reads the device id from the topic (`mappings/mqtt/devicecontent.json`). The publishes
//! are made by a real MQTT client, `mosquitto_pub`, directly and through a Mosquitto bridge
//! (docs/mqtt.md). Fails, not skips, when the MQTT listener is not there.

mod common;

use common::services::{self, Bed, Connector, Fhir, Setup, bed, repo_path};
use common::vitals::*;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn mqtt_port() -> u16 {
    std::env::var("IOMT_MQTT_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(1884)
}

fn require_mqtt() {
    let addr = format!("127.0.0.1:{}", mqtt_port());
    if let Err(e) = std::net::TcpStream::connect(&addr) {
        panic!("RabbitMQ's MQTT listener is not on {addr} ({e}): run scripts/setup.sh (docs/mqtt.md)");
    }
}

/// Each device's topic and the lines `mosquitto_pub -l` sends there.
type Topics = Vec<(String, Vec<String>)>;

/// The run's vitals as devices send them over MQTT (the device id only in the topic), and as
/// bodies with the device id (what the offline transform reads).
fn device_messages(run: &str, devices: usize, readings: usize) -> (Vec<Vec<u8>>, Topics) {
    let vitals = [Vital::HeartRate, Vital::Spo2, Vital::BloodPressure, Vital::Steps];
    let mut with_id = Vec::new();
    let mut per_topic = Vec::new();
    for d in 0..devices {
        let mut lines = Vec::new();
        for i in 0..readings {
            for v in vitals {
                let mut m = message(run, d, i, v);
                with_id.push(serde_json::to_vec(&m).unwrap_or_default());
                m.as_object_mut().map(|o| o.remove("deviceId"));
                lines.push(m.to_string());
            }
        }
        // The run as the last level: tests running at once each bind only their own devices.
        per_topic.push((format!("devices/{run}-dev-{d}/{run}"), lines));
    }
    (with_id, per_topic)
}

/// `mosquitto_pub -q 1` of each line as a message on `topic`, one connection; the PUBACKs it got.
async fn mqtt_publish(port: u16, user: Option<(&str, &str)>, topic: &str, lines: &[String]) -> usize {
    let mut cmd = tokio::process::Command::new("mosquitto_pub");
    cmd.args(["-d", "-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", topic, "-l"]);
    if let Some((u, p)) = user {
        cmd.args(["-u", u, "-P", p]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("mosquitto_pub (scripts/setup.sh installs mosquitto-clients): {e}"));
    let mut stdin = child.stdin.take().unwrap_or_else(|| panic!("stdin"));
    let text = lines.join("\n") + "\n";
    tokio::io::AsyncWriteExt::write_all(&mut stdin, text.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("mosquitto_pub did not finish in 60 s"))
        .unwrap_or_else(|e| panic!("{e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "mosquitto_pub: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout.lines().filter(|l| l.contains("received PUBACK")).count()
}

fn mqtt_setup<'a>(run: &str, queue: &'a str, system: &'a str) -> Setup<'a> {
    let mut s = Setup::new(queue, "Create", system);
    s.device_mapping = repo_path("mappings/mqtt/devicecontent.json");
    s.extra.push(("IOMT_BROKER__MQTT_TOPICS", format!("[\"devices/+/{run}\"]")));
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn qos1_publishes_become_observations_with_the_device_id_from_the_topic() {
    require_mqtt();
    let Bed { run, system, queue, ch, _conn } = bed("mqtt").await;
    let (devices, readings) = (3, 20);
    let (with_id, per_topic) = device_messages(&run, devices, readings);
    let connector = Connector::start(&mqtt_setup(&run, &queue, &system)).await;
    // Another topic on the same exchange: the filter binds only `devices/+/{run}`.
    let other = format!("wards/{run}-dev-0/{run}");
    assert_eq!(mqtt_publish(mqtt_port(), Some(("guest", "guest")), &other, &per_topic[0].1[..4]).await, 4);
    for (topic, lines) in &per_topic {
        let acks = mqtt_publish(mqtt_port(), Some(("guest", "guest")), topic, lines).await;
        assert_eq!(acks, lines.len(), "one PUBACK per QoS 1 publish on {topic}");
    }
    connector.wait_acked(with_id.len() as f64, Duration::from_secs(120)).await;
    let m = connector.metrics().await;
    assert_eq!(m.get("iomt_messages_acked_total"), Some(&(with_id.len() as f64)), "only the bound topic: {m:?}");
    assert!(!m.keys().any(|k| k.starts_with("iomt_dead_lettered_total")), "nothing dead-lettered: {m:?}");
    assert_converged(&Fhir::new(), &run, devices, &uninterrupted(&with_id, &system)).await;
    assert_eq!(services::queue_counts(&queue), (0, 0), "nothing left ready or unacked");
    assert_eq!(services::queue_type(&queue), "quorum", "QoS 1 publishes are persistent, in a quorum queue");
    drop(connector);
    services::delete_queue(&ch, &queue).await;
}

/// A Mosquitto of the test's own, bridged to RabbitMQ as docs/mqtt.md shows: devices publish to
/// Mosquitto (no credentials), the bridge forwards `devices/#` at QoS 1.
#[tokio::test(flavor = "multi_thread")]
async fn a_mosquitto_bridge_forwards_devices_topics_to_the_connector() {
    require_mqtt();
    let Bed { run, system, queue, ch, _conn } = bed("mqttbridge").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = std::env::temp_dir().join(format!("{run}-mosquitto"));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let conf = dir.join("mosquitto.conf");
    let log = dir.join("mosquitto.log");
    // As root, Mosquitto would drop to its own user, which cannot write the log here.
    let root = if is_root() { "user root\n" } else { "" };
    std::fs::write(
        &conf,
        format!(
            "{root}listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest file {log}\nlog_type all\n\
             connection rabbitmq\naddress 127.0.0.1:{mqtt}\nremote_username guest\nremote_password guest\n\
             remote_clientid {run}-bridge\ntry_private false\ncleansession false\ntopic devices/# out 1\n",
            log = log.display(),
            mqtt = mqtt_port(),
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let _mosquitto = tokio::process::Command::new(if std::path::Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    })
    .arg("-c")
    .arg(&conf)
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .kill_on_drop(true)
    .spawn()
    .unwrap_or_else(|e| panic!("mosquitto (scripts/setup.sh installs it): {e}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("Received CONNACK on connection") {
        assert!(
            Instant::now() < deadline,
            "the bridge did not connect to RabbitMQ's MQTT listener in 30 s:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (devices, readings) = (2, 10);
    let (with_id, per_topic) = device_messages(&run, devices, readings);
    let connector = Connector::start(&mqtt_setup(&run, &queue, &system)).await;
    for (topic, lines) in &per_topic {
        assert_eq!(mqtt_publish(port, None, topic, lines).await, lines.len());
    }
    connector.wait_acked(with_id.len() as f64, Duration::from_secs(120)).await;
    assert_converged(&Fhir::new(), &run, devices, &uninterrupted(&with_id, &system)).await;
    drop(connector);
    services::delete_queue(&ch, &queue).await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Sharded topology: the consistent-hash exchange is bound to `amq.topic` exchange to exchange and
/// hashes the routing key, the topic, which holds the device id: each device's publishes all land
/// on one shard queue, and the devices spread over the shards.
#[tokio::test(flavor = "multi_thread")]
async fn sharded_each_devices_topic_lands_on_one_shard_queue() {
    require_mqtt();
    let run = services::unique("mqttshard");
    let conn = services::broker().await;
    let ch = conn.create_channel().await.unwrap_or_else(|e| panic!("{e}"));
    let mut b = services::broker_settings(&format!("{run}.q"));
    b.topology = iomt_connector::config::Topology::Sharded;
    b.shard_queues = 3;
    b.mqtt_topics = vec![format!("devices/+/{run}")];
    let warnings =
        iomt_connector::source::rabbitmq::declare(&conn, &b).await.unwrap_or_else(|e| panic!("declare: {e}"));
    assert!(warnings.is_empty(), "{warnings:?}");

    let devices = 12;
    for d in 0..devices {
        let lines: Vec<String> = (0..5).map(|i| message(&run, d, i, Vital::HeartRate).to_string()).collect();
        let topic = format!("devices/{run}-dev-{d}/{run}");
        assert_eq!(mqtt_publish(mqtt_port(), Some(("guest", "guest")), &topic, &lines).await, 5);
    }
    let mut shard_of = std::collections::HashMap::new();
    let mut used = std::collections::HashSet::new();
    let mut total = 0;
    for k in 0..b.shard_queues {
        let q = iomt_connector::source::rabbitmq::shard_queue(&b, k);
        for body in consume_all(&conn, &q).await {
            let m: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let device = m["deviceId"].as_str().unwrap_or_default().to_string();
            assert_eq!(*shard_of.entry(device.clone()).or_insert(k), k, "{device} on two shard queues");
            used.insert(k);
            total += 1;
        }
        services::delete_queue(&ch, &q).await;
    }
    let _ = ch.exchange_delete(b.queue.as_str().into(), Default::default()).await;
    services::delete_queue(&ch, &b.dead_letter_queue).await;
    assert_eq!(total, devices * 5, "every publish routed to a shard queue");
    assert_eq!(shard_of.len(), devices);
    assert!(used.len() > 1, "12 devices spread over more than one of 3 shard queues: {shard_of:?}");
}

/// Every message in a single-active-consumer queue (no `basic.get` there), each checked to be
/// persistent.
async fn consume_all(conn: &lapin::Connection, queue: &str) -> Vec<Vec<u8>> {
    use futures_util::StreamExt;
    let ch = conn.create_channel().await.unwrap_or_else(|e| panic!("{e}"));
    let n = services::ready_count(&ch, queue).await as usize;
    let options = lapin::options::BasicConsumeOptions { no_ack: true, ..Default::default() };
    let mut consumer = ch
        .basic_consume(queue.into(), "mqtt-test".into(), options, Default::default())
        .await
        .unwrap_or_else(|e| panic!("consume {queue}: {e}"));
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), consumer.next()).await {
            Ok(Some(Ok(d))) => {
                // QoS 1: the plugin publishes it persistent.
                assert_eq!(*d.properties.delivery_mode(), Some(2), "{queue}: a QoS 1 publish is persistent");
                out.push(d.data)
            }
            other => panic!("{queue}: {} of {n} messages, then {other:?}", out.len()),
        }
    }
    let _ = ch.close(200, "drained".into()).await;
    out
}

/// Dead letters of MQTT publishes carry their topic: read with a mapping that did not look at it
/// (no device id in the body), they are dead-lettered; `dead-letters redrive` with the topic
/// mapping finds that they now pass (it rebuilds the envelope with the topic) and sends them back
/// through `amq.topic` with their topic, and they are written.
#[tokio::test(flavor = "multi_thread")]
async fn mqtt_dead_letters_redrive_with_their_topic() {
    require_mqtt();
    let Bed { run, system, queue, ch, _conn } = bed("mqttredrive").await;
    let (devices, readings) = (2, 5);
    let (with_id, per_topic) = device_messages(&run, devices, readings);
    let fixed = mqtt_setup(&run, &queue, &system);
    let mut broken = mqtt_setup(&run, &queue, &system);
    broken.device_mapping = repo_path("mappings/devicecontent.json");
    let c = Connector::start(&broken).await;
    for (topic, lines) in &per_topic {
        assert_eq!(mqtt_publish(mqtt_port(), Some(("guest", "guest")), topic, lines).await, lines.len());
    }
    c.wait_acked(with_id.len() as f64, Duration::from_secs(60)).await;
    let m = c.metrics().await;
    let dead: f64 = m.iter().filter(|(k, _)| k.starts_with("iomt_dead_lettered_total")).map(|(_, v)| v).sum();
    assert_eq!(dead, with_id.len() as f64, "every message dead-lettered: {m:?}");
    drop(c);
    let dlq = format!("{queue}.dlq");
    assert_eq!(services::ready_count(&ch, &dlq).await as usize, with_id.len(), "in the dead-letter queue");

    let env = Connector::env_for(&fixed);
    let (code, out) = services::dead_letters(&env, &["redrive", "--dry-run"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("would now pass the mappings: {}", with_id.len())), "{out}");
    let c = Connector::start(&fixed).await;
    let (code, out) = services::dead_letters(&env, &["redrive"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("moved {} back", with_id.len())), "{out}");
    c.wait_acked(with_id.len() as f64, Duration::from_secs(60)).await;
    assert_converged(&Fhir::new(), &run, devices, &uninterrupted(&with_id, &system)).await;
    drop(c);
    for q in [queue, dlq] {
        services::delete_queue(&ch, &q).await;
    }
}

/// The plugin's topic → routing key, as the binding keys assume it: `/` becomes `.`, a `.` stays
/// (RabbitMQ 3.10), so a filter with a dotted level matches the topic it names.
#[tokio::test(flavor = "multi_thread")]
async fn a_filter_with_a_dot_in_a_level_matches_its_topic() {
    require_mqtt();
    let Bed { run, queue, ch, _conn, .. } = bed("mqttdot").await;
    let mut b = services::broker_settings(&queue);
    b.mqtt_topics = vec![format!("fw/v1.2/+/{run}")];
    iomt_connector::source::rabbitmq::declare(&_conn, &b).await.unwrap_or_else(|e| panic!("declare: {e}"));
    let lines = vec!["{}".to_string()];
    let auth = Some(("guest", "guest"));
    assert_eq!(mqtt_publish(mqtt_port(), auth, &format!("fw/v1.2/dev-1/{run}"), &lines).await, 1);
    assert_eq!(mqtt_publish(mqtt_port(), auth, &format!("fw/v1.3/dev-1/{run}"), &lines).await, 1);
    assert_eq!(services::ready_count(&ch, &queue).await, 1, "fw/v1.2/dev-1 routed, fw/v1.3/dev-1 not");
    services::delete_queue(&ch, &queue).await;
}
