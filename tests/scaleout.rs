//! Scale-out on RabbitMQ (`broker.topology = "sharded"`): a consistent-hash exchange spreads devices
//! over 6 shard queues, each with a single active consumer, shared by 3 instances. Against the real
//! RabbitMQ (its management API tells which consumer is active) and the real FHIR server.

mod common;

use common::services::{self, Connector, Fhir, Setup};
use common::vitals::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const SHARD_QUEUES: u16 = 6;
const INSTANCES: u16 = 3;
const MANAGEMENT: &str = "http://127.0.0.1:15672";

/// Scale-out tests run one at a time: each runs three connectors.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Cluster {
    run: String,
    system: String,
    /// The exchange devices publish to (broker.queue); the shard queues are `{exchange}.shard-K`.
    exchange: String,
    instances: Vec<Connector>,
    conn: lapin::Connection,
}

fn shard(exchange: &str, k: u16) -> String {
    format!("{exchange}.shard-{k}")
}

/// Declares the sharded topology as the connectors will, then starts the three instances together
/// (so that each becomes the active consumer of its own queues first).
async fn cluster(name: &str) -> Cluster {
    services::require_fhir().await;
    let run = services::unique(name);
    let system = format!("urn:iomt-test:{run}");
    let exchange = format!("{run}.devices");
    let conn = services::broker().await;
    let mut b = services::broker_settings(&exchange);
    b.topology = iomt_connector::config::Topology::Sharded;
    b.shard_queues = SHARD_QUEUES;
    b.instances = INSTANCES;
    let warnings = iomt_connector::source::rabbitmq::declare(&conn, &b).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(warnings.is_empty(), "{warnings:?}");
    let mut instances = Vec::new();
    for i in 0..INSTANCES {
        let mut setup = Setup::new(&exchange, "Create", &system);
        setup.extra.push(("IOMT_BROKER__TOPOLOGY", "sharded".into()));
        setup.extra.push(("IOMT_BROKER__SHARD_QUEUES", SHARD_QUEUES.to_string()));
        setup.extra.push(("IOMT_BROKER__INSTANCES", INSTANCES.to_string()));
        setup.extra.push(("IOMT_BROKER__INSTANCE", i.to_string()));
        setup.extra.push(("IOMT_BROKER__MANAGEMENT_URL", MANAGEMENT.into()));
        instances.push(Connector::spawn_env(Connector::env_for(&setup)));
    }
    for c in &instances {
        c.wait_ready().await;
    }
    Cluster { run, system, exchange, instances, conn }
}

/// The shard queues an instance is the active consumer of, from its `/actors`.
async fn active_on(c: &Connector) -> BTreeSet<String> {
    let (_, body) = c.get("/actors").await;
    let a: Value = serde_json::from_str(&body).unwrap_or_default();
    a["source"]["queues"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|q| q["active"] == true)
        .filter_map(|q| q["name"].as_str().map(str::to_string))
        .collect()
}

/// Every shard queue, and the instances that are its active consumer.
async fn activity(instances: &[&Connector]) -> BTreeMap<String, Vec<usize>> {
    let mut by_queue: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, c) in instances.iter().enumerate() {
        for q in active_on(c).await {
            by_queue.entry(q).or_default().push(i);
        }
    }
    by_queue
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    start.elapsed()
}

/// Publishes to the exchange with each message's device id as the routing key.
async fn publish(cl: &Cluster, msgs: &[Vec<u8>]) {
    let ch = cl.conn.create_channel().await.unwrap_or_else(|e| panic!("{e}"));
    let routed = msgs.iter().map(|b| {
        let v: Value = serde_json::from_slice(b).unwrap_or_default();
        (v["deviceId"].as_str().unwrap_or_default().to_string(), b)
    });
    services::publish_routed(&ch, &cl.exchange, routed).await;
}

/// Every shard queue drained and no instance holding anything, for 3 s in a row.
async fn drained(cl: &Cluster, live: &[&Connector]) {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut quiet = 0;
    while quiet < 4 {
        assert!(Instant::now() < deadline, "the shard queues did not drain");
        tokio::time::sleep(Duration::from_millis(750)).await;
        let mut idle = (0..SHARD_QUEUES).all(|k| services::queue_counts(&shard(&cl.exchange, k)) == (0, 0));
        for c in live {
            idle &= c.metric("iomt_unacked_messages").await == 0.0;
        }
        quiet = if idle { quiet + 1 } else { 0 };
    }
}

/// Messages acked by all these instances together.
async fn acked(instances: &[Connector]) -> f64 {
    let mut n = 0.0;
    for c in instances {
        n += c.metric("iomt_messages_acked_total").await;
    }
    n
}

async fn assert_no_create_races(live: &[&Connector]) {
    for c in live {
        assert_eq!(c.metric("iomt_fhir_create_races_total").await, 0.0, "no window repaired from _history");
        let dead: Vec<_> =
            c.metrics().await.into_iter().filter(|(k, _)| k.starts_with("iomt_dead_lettered_total")).collect();
        assert!(dead.is_empty(), "{dead:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_instances_over_six_shard_queues_handle_each_device_on_one_instance() {
    let _one = ONE_AT_A_TIME.lock().await;
    let cl = cluster("sharded").await;
    let all: Vec<&Connector> = cl.instances.iter().collect();
    // Each instance becomes the active consumer of its own two queues: k % 3 == i.
    wait_for("each instance active on its own queues", Duration::from_secs(30), || async {
        let a = activity(&all).await;
        (0..SHARD_QUEUES).all(|k| a.get(&shard(&cl.exchange, k)) == Some(&vec![(k % INSTANCES) as usize]))
    })
    .await;

    let devices = 60;
    let msgs = bodies(&cl.run, devices, 10, &[Vital::HeartRate, Vital::Spo2, Vital::BloodPressure]);
    publish(&cl, &msgs).await;
    drained(&cl, &all).await;

    // Each shard queue's messages went to exactly one instance, the one active on it; together
    // they are every message once.
    let mut total = 0.0;
    for k in 0..SHARD_QUEUES {
        let q = shard(&cl.exchange, k);
        let mut consumers = Vec::new();
        for (i, c) in all.iter().enumerate() {
            let n = c.metric(&format!("iomt_queue_deliveries_total{{queue=\"{q}\"}}")).await;
            if n > 0.0 {
                consumers.push(i);
                total += n;
            }
        }
        println!("{q}: handled by instance {consumers:?}");
        assert_eq!(consumers, vec![(k % INSTANCES) as usize], "{q} handled by one instance");
    }
    assert_eq!(total, msgs.len() as f64, "every message delivered once");
    for (i, c) in all.iter().enumerate() {
        let m = c.metrics().await;
        println!("instance {i}: {} messages", m.get("iomt_messages_received_total").copied().unwrap_or(0.0));
        assert!(m.get("iomt_messages_received_total").copied().unwrap_or(0.0) > 0.0, "instance {i} worked");
    }
    assert_no_create_races(&all).await;
    assert_converged(&Fhir::new(), &cl.run, devices, &uninterrupted(&msgs, &cl.system)).await;
}

/// Publishes `msgs` through the exchange at about `per_second`, in the background.
fn stream(cl: &Cluster, msgs: Vec<Vec<u8>>, per_second: usize) -> tokio::task::JoinHandle<()> {
    let exchange = cl.exchange.clone();
    tokio::spawn(async move {
        let conn = services::broker().await;
        let ch = conn.create_channel().await.unwrap_or_else(|e| panic!("{e}"));
        let start = Instant::now();
        let tick = per_second.max(4) / 4;
        for (k, chunk) in msgs.chunks(tick).enumerate() {
            let routed = chunk.iter().map(|b| {
                let v: Value = serde_json::from_slice(b).unwrap_or_default();
                (v["deviceId"].as_str().unwrap_or_default().to_string(), b)
            });
            services::publish_routed(&ch, &exchange, routed).await;
            tokio::time::sleep_until((start + Duration::from_millis(250 * (k as u64 + 1))).into()).await;
        }
    })
}

async fn received(c: &Connector) -> f64 {
    c.metric("iomt_messages_received_total").await
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_one_instance_mid_stream_moves_its_queues_and_loses_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut cl = cluster("failover").await;
    let all: Vec<&Connector> = cl.instances.iter().collect();
    wait_for("each instance active on its own queues", Duration::from_secs(30), || async {
        activity(&all).await.len() == SHARD_QUEUES as usize
    })
    .await;
    // 90 devices streamed for about 30 s, so every queue keeps getting messages through the takeover.
    let devices = 90;
    let msgs = bodies(&cl.run, devices, 30, &[Vital::HeartRate, Vital::Spo2, Vital::BloodPressure]);
    let publishing = stream(&cl, msgs.clone(), msgs.len() / 30);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let victim_queues = active_on(&cl.instances[1]).await;
    assert!(!victim_queues.is_empty(), "instance 1 was active on its queues");
    let before = acked(&cl.instances).await;
    cl.instances[1].signal("KILL");
    let killed = Instant::now();
    cl.instances[1].wait(Duration::from_secs(10)).await;
    println!(
        "instance 1 killed with {before} of {} messages acked in all; it was active on {victim_queues:?}",
        msgs.len()
    );
    assert!(before < msgs.len() as f64, "killed mid-stream");

    let survivors: Vec<&Connector> = vec![&cl.instances[0], &cl.instances[2]];
    let took = wait_for("the survivors took over every shard queue", Duration::from_secs(60), || async {
        let a = activity(&survivors).await;
        a.len() == SHARD_QUEUES as usize && a.values().all(|who| who.len() == 1)
    })
    .await;
    // During the takeover grace (broker.takeover_grace_ms, 10 s) the survivors' own queues flow on.
    let at_takeover = (received(survivors[0]).await, received(survivors[1]).await);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during_grace = (received(survivors[0]).await - at_takeover.0, received(survivors[1]).await - at_takeover.1);
    let mut spread = vec![0usize; survivors.len()];
    for who in activity(&survivors).await.values() {
        spread[who[0]] += 1;
    }
    println!(
        "its queues were active on the survivors {:.1} s after the kill, spread {spread:?}; in the 4 s after, the survivors took {during_grace:?} messages",
        took.as_secs_f64().max(0.0)
    );
    assert_eq!(spread, [3, 3], "the dead instance's queues spread over the survivors");
    let handed = wait_for("the taken-over queues handed over after their grace", Duration::from_secs(60), || async {
        let logs: String = survivors.iter().map(|c| c.log()).collect();
        victim_queues
            .iter()
            .all(|q| logs.lines().any(|l| l.contains("takeover grace is over") && l.contains(q.as_str())))
    })
    .await;
    let handed = handed.as_secs_f64() + took.as_secs_f64() + 4.0;
    println!("the killed instance's queues were handled again {handed:.1} s after the kill (grace 10 s)");
    assert!(handed <= 16.0, "handled again {handed:.1} s after the kill: more than the grace and a few seconds");
    assert!(during_grace.0 > 0.0 && during_grace.1 > 0.0, "neither survivor paused its own queues: {during_grace:?}");

    publishing.await.unwrap_or_else(|e| panic!("{e}"));
    drained(&cl, &survivors).await;
    println!("everything written {:.1} s after the kill", killed.elapsed().as_secs_f64());
    assert_no_create_races(&survivors).await;
    assert_converged(&Fhir::new(), &cl.run, devices, &uninterrupted(&msgs, &cl.system)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_of_the_sharded_topology_are_redriven_through_the_exchange() {
    let _one = ONE_AT_A_TIME.lock().await;
    services::require_fhir().await;
    let run = services::unique("shardredrive");
    let system = format!("urn:iomt-test:{run}");
    let exchange = format!("{run}.devices");
    let sharded = |setup: &mut Setup| {
        setup.extra.push(("IOMT_BROKER__TOPOLOGY", "sharded".into()));
        setup.extra.push(("IOMT_BROKER__SHARD_QUEUES", "2".into()));
    };
    let mut broken = Setup::new(&exchange, "Create", &system);
    broken.device_mapping = services::broken_device_mapping(&run);
    sharded(&mut broken);
    let mut c = Connector::start(&broken).await;
    let conn = services::broker().await;
    let cl =
        Cluster { run: run.clone(), system: system.clone(), exchange: exchange.clone(), instances: Vec::new(), conn };
    let msgs = bodies(&run, 4, 5, &[Vital::HeartRate]);
    publish(&cl, &msgs).await;
    c.wait_acked(msgs.len() as f64, Duration::from_secs(60)).await;
    c.signal("TERM");
    assert_eq!(c.wait(Duration::from_secs(60)).await, Some(0));

    let mut fixed = Setup::new(&exchange, "Create", &system);
    sharded(&mut fixed);
    let c = Connector::start(&fixed).await;
    let (code, out) = services::dead_letters(&Connector::env_for(&fixed), &["redrive"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("moved {} back", msgs.len())), "{out}");
    c.wait_acked(msgs.len() as f64, Duration::from_secs(60)).await;
    let delivered: f64 = {
        let mut n = 0.0;
        for k in 0..2 {
            n += c.metric(&format!("iomt_queue_deliveries_total{{queue=\"{}\"}}", shard(&exchange, k))).await;
        }
        n
    };
    assert_eq!(delivered, msgs.len() as f64, "redriven into the shard queues");
    assert_converged(&Fhir::new(), &run, 4, &uninterrupted(&msgs, &system)).await;
}
