//! When things go wrong: the FHIR server stopped, hanging, or answering 429/503; RabbitMQ restarted
//! with messages in flight; a broken mapping's dead letters redriven. Against the real RabbitMQ and
//! real FHIR servers (a sekmet instance of these tests' own that they stop and start, and mitmproxy
//! as a fault-injecting proxy in front of the shared one; scripts/setup.sh installs both).
//!
//! The tests of this file run one at a time: one restarts the broker under everyone's feet.

mod common;

use common::services::{self, Connector, FaultProxy, Fhir, OwnFhirServer, Setup, broken_device_mapping, dead_letters};
use common::vitals::*;
use serde_json::Value;
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The port of the FHIR server these tests stop and start (its data lives beside the shared one's
/// in .services/, under this port's name).
const OWN_FHIR_PORT: u16 = 8091;

/// Publishes `msgs` at `per_second`, on a connection of its own, in the background.
fn stream(queue: &str, msgs: Vec<Vec<u8>>, per_second: usize) -> tokio::task::JoinHandle<()> {
    let queue = queue.to_string();
    tokio::spawn(async move {
        let conn = services::broker().await;
        let ch = conn.create_channel().await.unwrap_or_else(|e| panic!("{e}"));
        let start = Instant::now();
        for (k, chunk) in msgs.chunks(per_second.max(1)).enumerate() {
            services::publish(&ch, &queue, chunk).await;
            let next = start + Duration::from_secs(k as u64 + 1);
            tokio::time::sleep_until(next.into()).await;
        }
    })
}

/// Waits until `f` holds, polling; panics with `what` after `timeout`.
async fn until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Nothing dead-lettered: no counter, an empty dead-letter queue.
async fn assert_nothing_dead_lettered(c: &Connector, queue: &str) {
    let m = c.metrics().await;
    let dead: Vec<_> = m.iter().filter(|(k, _)| k.starts_with("iomt_dead_lettered_total")).collect();
    assert!(dead.is_empty(), "dead-lettered: {dead:?}");
    assert_eq!(services::queue_counts(&format!("{queue}.dlq")), (0, 0), "the dead-letter queue is empty");
}

/// Seconds from `back` until the connector has closed its circuit and acked more than before.
async fn recovery(c: &Connector, back: Instant) -> f64 {
    let acked = c.metric("iomt_messages_acked_total").await;
    until("recovery after the FHIR server returned", Duration::from_secs(120), || async {
        c.metric("iomt_fhir_circuit_open").await == 0.0 && c.metric("iomt_messages_acked_total").await > acked
    })
    .await;
    back.elapsed().as_secs_f64()
}

/// During an outage: not ready, with the reason; the circuit open; held, nothing dead-lettered.
async fn assert_holding(c: &Connector, queue: &str) {
    until("the circuit opens", Duration::from_secs(60), || async { c.metric("iomt_fhir_circuit_open").await == 1.0 })
        .await;
    let (status, body) = c.get("/health/ready").await;
    assert_eq!(status, 503, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap_or_default();
    assert_eq!(ready["fhir"], false, "{body}");
    let reason = ready["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("FHIR server is unavailable") && reason.contains("held"), "{body}");
    assert!(c.metric("iomt_unacked_messages").await > 0.0, "messages are held unacked");
    assert_nothing_dead_lettered(c, queue).await;
}

/// Streams `msgs` at 40 msg/s; `begin` the fault after `outage.0`, `end` it `outage.1` later (the
/// connector holding all along); then everything is acked and nothing dead-lettered. Prints how
/// much was held and how soon writing resumed.
async fn through_an_outage(
    what: &str,
    c: &Connector,
    queue: &str,
    msgs: &[Vec<u8>],
    outage: (Duration, Duration),
    begin: impl AsyncFn(),
    end: impl AsyncFn(),
) {
    let publishing = stream(queue, msgs.to_vec(), 40);
    tokio::time::sleep(outage.0).await;
    assert!(c.metric("iomt_messages_acked_total").await > 0.0, "written before the outage");
    begin().await;
    let began = Instant::now();
    assert_holding(c, queue).await;
    tokio::time::sleep(outage.1.saturating_sub(began.elapsed())).await;
    assert_holding(c, queue).await;
    let held = c.metric("iomt_unacked_messages").await;
    end().await;
    let took = recovery(c, Instant::now()).await;
    println!("{what}: {held} messages held unacked at its end; writing resumed {took:.1} s after it answered again");
    publishing.await.unwrap_or_else(|e| panic!("{e}"));
    c.wait_acked(msgs.len() as f64, Duration::from_secs(300)).await;
    assert_nothing_dead_lettered(c, queue).await;
}

/// A test's run id, identifier system and queue (declared), and its stream of messages.
struct Outage {
    run: String,
    system: String,
    queue: String,
    msgs: Vec<Vec<u8>>,
    conn: lapin::Connection,
}

async fn outage(name: &str, readings: usize) -> Outage {
    outage_of(name, 20, readings).await
}

async fn outage_of(name: &str, devices: usize, readings: usize) -> Outage {
    let run = services::unique(name);
    let system = format!("urn:iomt-test:{run}");
    let queue = format!("{run}.q");
    // Hourly heart-rate and SpO2 windows and an instant blood pressure per reading and device.
    let msgs = bodies(&run, devices, readings, &[Vital::HeartRate, Vital::Spo2, Vital::BloodPressure]);
    let conn = services::broker().await;
    services::declare(&conn, &queue).await;
    Outage { run, system, queue, msgs, conn }
}

impl Outage {
    /// The connector on this test's queue, writing to `fhir`, with `extra` settings.
    async fn connector(&self, fhir: String, extra: &[(&'static str, &str)]) -> Connector {
        let mut setup = Setup::new(&self.queue, "Create", &self.system);
        setup.extra.push(("IOMT_FHIR__BASE_URL", fhir));
        setup.extra.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        Connector::start(&setup).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fhir_server_stopped_for_60_s_mid_stream_loses_nothing_and_dead_letters_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = OwnFhirServer { port: OWN_FHIR_PORT };
    server.ctl("start");
    let o = outage("stopped", 60).await;
    let c = o.connector(server.url(), &[("IOMT_FHIR__TIMEOUT_MS", "3000")]).await;
    let Outage { run, system, queue, msgs, .. } = &o;

    // 20 devices x 3 vitals at 40 msg/s: 90 s of stream; the server is away from 15 s to 75 s.
    let outage = (Duration::from_secs(15), Duration::from_secs(60));
    through_an_outage(
        "FHIR server stopped for 60 s",
        &c,
        queue,
        msgs,
        outage,
        async || server.ctl("stop"),
        async || server.ctl("start"),
    )
    .await;
    let m = c.metrics().await;
    assert!(m.get("iomt_fhir_outage_seconds_total").copied().unwrap_or(0.0) >= 50.0, "{m:?}");
    assert!(m.get("iomt_fhir_wait_seconds_total{cause=\"backoff\"}").copied().unwrap_or(0.0) > 0.0, "{m:?}");
    let (status, _) = c.get("/health/ready").await;
    assert_eq!(status, 200, "ready again");
    assert_converged(&Fhir::at(&server.url()), run, 20, &uninterrupted(msgs, system)).await;
    assert_eq!(services::queue_counts(queue), (0, 0), "the queue is drained");
    server.ctl("stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn fhir_server_hanging_for_45_s_mid_stream_loses_nothing_and_dead_letters_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    services::require_fhir().await;
    let proxy = FaultProxy::start(&services::fhir_url()).await;
    let o = outage("hanging", 40).await;
    let c = o.connector(proxy.url(&services::fhir_url()), &[("IOMT_FHIR__TIMEOUT_MS", "2000")]).await;
    let Outage { run, system, queue, msgs, .. } = &o;

    // 60 s of stream; the server hangs (accepts, never answers) from 10 s to 55 s.
    let outage = (Duration::from_secs(10), Duration::from_secs(45));
    let (hang, pass) = (async || proxy.mode("hang").await, async || proxy.mode("pass").await);
    through_an_outage("FHIR server hanging for 45 s", &c, queue, msgs, outage, hang, pass).await;
    let hangs = proxy.log().await.iter().filter(|e| e["injected"] == "hang").count();
    assert!(hangs > 0, "requests were held unanswered");
    assert_converged(&Fhir::new(), run, 20, &uninterrupted(msgs, system)).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_after_on_429_and_503_is_honoured_and_nothing_is_dead_lettered() {
    let _one = ONE_AT_A_TIME.lock().await;
    services::require_fhir().await;
    let proxy = FaultProxy::start(&services::fhir_url()).await;
    let o = outage("throttled", 12).await;
    // One writer: its requests follow each other, so a retry is the next request to its path.
    let c = o.connector(proxy.url(&services::fhir_url()), &[("IOMT_PIPELINE__WRITERS", "1")]).await;
    let Outage { run, system, queue, msgs, conn } = &o;
    let ch = conn.create_channel().await.unwrap_or_else(|e| panic!("{e}"));
    let (first, rest) = msgs.split_at(msgs.len() / 3);
    services::publish(&ch, queue, first).await;
    c.wait_acked(first.len() as f64, Duration::from_secs(120)).await;

    // Two 429s, then two 503s, each with Retry-After: 3, on the writes that follow.
    let (second, third) = rest.split_at(rest.len() / 2);
    proxy.inject(429, 3, 2, "PUT,POST").await;
    services::publish(&ch, queue, second).await;
    c.wait_acked((first.len() + second.len()) as f64, Duration::from_secs(120)).await;
    proxy.inject(503, 3, 2, "PUT,POST").await;
    services::publish(&ch, queue, third).await;
    c.wait_acked(msgs.len() as f64, Duration::from_secs(120)).await;

    let log = proxy.log().await;
    let faults: Vec<&Value> = log.iter().filter(|e| e["injected"].is_u64()).collect();
    assert_eq!(faults.len(), 4, "{faults:?}");
    for f in &faults {
        let t = f["t"].as_f64().unwrap_or_default();
        let retry = log
            .iter()
            .find(|e| e["t"].as_f64().unwrap_or_default() > t && e["method"] == f["method"] && e["path"] == f["path"])
            .unwrap_or_else(|| panic!("no retry after {f}"));
        let gap = retry["t"].as_f64().unwrap_or_default() - t;
        println!("HTTP {} with Retry-After: 3 → retried after {gap:.2} s", f["injected"]);
        assert!(gap >= 2.9, "HTTP {} with Retry-After: 3 was retried after {gap:.2} s", f["injected"]);
    }
    let waited = c.metric("iomt_fhir_wait_seconds_total{cause=\"retry-after\"}").await;
    assert!(waited >= 4.0 * 2.9, "Retry-After waits counted: {waited}");
    let log = c.log();
    assert!(log.contains("retry_in_ms=3000 cause=\"retry-after\""), "the wait is logged:\n{log}");
    assert_nothing_dead_lettered(&c, queue).await;
    assert_converged(&Fhir::new(), run, 20, &uninterrupted(msgs, system)).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_that_are_not_fhir_are_held_like_an_outage_and_nothing_is_lost() {
    let _one = ONE_AT_A_TIME.lock().await;
    services::require_fhir().await;
    let proxy = FaultProxy::start(&services::fhir_url()).await;
    let o = outage("garbage", 40).await;
    let c = o.connector(proxy.url(&services::fhir_url()), &[]).await;
    let Outage { run, system, queue, msgs, .. } = &o;

    // 60 s of stream; from 10 s to 40 s every request is answered 200 with an HTML page, an empty
    // body, broken JSON or a batch-response without entries, never reaching the server.
    let publishing = stream(queue, msgs.to_vec(), 40);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(c.metric("iomt_messages_acked_total").await > 0.0, "written before the fault");
    proxy.mode("garbage").await;
    let began = Instant::now();
    assert_holding(&c, queue).await;
    // Acks of writes that finished before the fault may still be on their way (an ack waits up
    // to 1 s for the tags before it); after that, no answer of the fault may count as written.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let acked = c.metric("iomt_messages_acked_total").await;
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(began.elapsed())).await;
    assert_holding(&c, queue).await;
    assert_eq!(c.metric("iomt_messages_acked_total").await, acked, "nothing acked on a 200 that is not FHIR");
    let garbage = proxy.log().await.iter().filter(|e| e["injected"] == "garbage").count();
    let (_, ready) = c.get("/health/ready").await;
    println!("{garbage} requests answered 200 with garbage; readiness said: {ready}");
    assert!(garbage > 0, "the fault was met");
    let invalid: f64 = c
        .metrics()
        .await
        .iter()
        .filter(|(k, _)| k.starts_with("iomt_fhir_invalid_responses_total"))
        .map(|(_, v)| v)
        .sum();
    assert!(invalid > 0.0, "counted in iomt_fhir_invalid_responses_total");
    let held = c.metric("iomt_unacked_messages").await;
    proxy.mode("pass").await;
    let took = recovery(&c, Instant::now()).await;
    println!("answers not FHIR for 30 s: {held} messages held unacked at its end; writing resumed {took:.1} s after");
    publishing.await.unwrap_or_else(|e| panic!("{e}"));
    c.wait_acked(msgs.len() as f64, Duration::from_secs(300)).await;
    assert_nothing_dead_lettered(&c, queue).await;
    assert_converged(&Fhir::new(), run, 20, &uninterrupted(msgs, system)).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_answered_without_a_version_or_creates_answered_200_are_read_back_and_nothing_is_lost() {
    let _one = ONE_AT_A_TIME.lock().await;
    services::require_fhir().await;
    let proxy = FaultProxy::start(&services::fhir_url()).await;
    let o = outage("noversion", 12).await;
    let c = o.connector(proxy.url(&services::fhir_url()), &[]).await;
    let Outage { run, system, queue, msgs, conn } = &o;
    let ch = conn.create_channel().await.unwrap_or_else(|e| panic!("{e}"));
    let (first, second) = msgs.split_at(msgs.len() / 2);

    // No etag, no Location, batch entries without etag, location or resource, creates as 200.
    proxy.mode("noversion").await;
    services::publish(&ch, queue, first).await;
    c.wait_acked(first.len() as f64, Duration::from_secs(120)).await;
    let confirmed = c.metric("iomt_fhir_unconfirmed_writes_total{result=\"confirmed\"}").await;
    assert!(confirmed > 0.0, "writes without a version were read back");

    // Creates answered 200 (with a version), and _history in either order.
    proxy.mode("create200").await;
    services::publish(&ch, queue, second).await;
    c.wait_acked(msgs.len() as f64, Duration::from_secs(120)).await;
    let histories =
        proxy.log().await.iter().filter(|e| e["path"].as_str().is_some_and(|p| p.contains("/_history"))).count();
    let races = c.metric("iomt_fhir_create_races_total").await;
    let missing = c.metric("iomt_fhir_unconfirmed_writes_total{result=\"missing\"}").await;
    println!(
        "{confirmed} writes without a version confirmed by reading back, {missing} missing; {histories} histories read after creates answered 200, {races} create races"
    );
    assert!(histories > 0, "a create answered 200 looks at the history");
    assert_eq!(races, 0.0, "a history with only our version is a plain create, not a race");
    assert_eq!(missing, 0.0, "the server wrote everything");
    assert_nothing_dead_lettered(&c, queue).await;
    assert_converged(&Fhir::new(), run, 20, &uninterrupted(msgs, system)).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_restarted_with_messages_in_flight_loses_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    services::require_fhir().await;
    let o = outage("brokerrestart", 60).await;
    let ch = o.conn.create_channel().await.unwrap_or_else(|e| panic!("{e}"));
    services::publish(&ch, &o.queue, &o.msgs).await;
    let extra = [("IOMT_BROKER__PREFETCH", "300"), ("IOMT_BROKER__RECONNECT_DELAY_SECS", "1")];
    let c = o.connector(services::fhir_url(), &extra).await;
    let Outage { run, system, queue, msgs, .. } = &o;
    until("a quarter acked", Duration::from_secs(120), || async {
        c.metric("iomt_messages_acked_total").await >= (msgs.len() / 4) as f64
    })
    .await;
    let in_flight = c.metric("iomt_unacked_messages").await;
    let acked = c.metric("iomt_messages_acked_total").await;
    services::rabbitmqctl(&["-q", "stop_app"]);
    println!("RabbitMQ stopped with {in_flight} messages in flight ({acked} of {} acked)", msgs.len());
    assert!(acked < msgs.len() as f64, "stopped mid-stream");
    tokio::time::sleep(Duration::from_secs(3)).await;
    services::rabbitmqctl(&["-q", "start_app"]);
    services::rabbitmqctl(&["-q", "await_startup"]);

    // Drained: the connector is consuming again (so the quorum queue is back, and its counts are
    // real), and the queue and the connector hold nothing, for 5 s in a row.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut quiet = 0;
    while quiet < 5 {
        assert!(Instant::now() < deadline, "not drained after the restart: {:?}", services::queue_counts(queue));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let consuming = c.get("/health/ready").await.0 == 200;
        let idle = services::queue_counts(queue) == (0, 0) && c.metric("iomt_unacked_messages").await == 0.0;
        quiet = if consuming && idle { quiet + 1 } else { 0 };
    }
    assert!(c.log().contains("broker connection lost; reconnecting"), "{}", services::tail(&c.log(), 20));
    assert_nothing_dead_lettered(&c, queue).await;
    assert_converged(&Fhir::new(), run, 20, &uninterrupted(msgs, system)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_mappings_dead_letters_are_redriven_once_it_is_fixed() {
    let _one = ONE_AT_A_TIME.lock().await;
    services::require_fhir().await;
    let run = services::unique("redrive");
    let system = format!("urn:iomt-test:{run}");
    let queue = format!("{run}.q");
    let conn = services::broker().await;
    let ch = conn.create_channel().await.unwrap_or_else(|e| panic!("{e}"));
    services::declare(&conn, &queue).await;
    let msgs = bodies(&run, 3, 10, &[Vital::HeartRate]);

    let mut broken = Setup::new(&queue, "Create", &system);
    broken.device_mapping = broken_device_mapping(&run);
    let mut c = Connector::start(&broken).await;
    services::publish(&ch, &queue, &msgs).await;
    c.wait_acked(msgs.len() as f64, Duration::from_secs(60)).await;
    c.signal("TERM");
    assert_eq!(c.wait(Duration::from_secs(60)).await, Some(0));
    let dlq = format!("{queue}.dlq");
    let all_dead = || async { services::ready_count(&ch, &dlq).await as usize == msgs.len() };
    until("every message dead-lettered", Duration::from_secs(30), all_dead).await;

    let fixed = Setup::new(&queue, "Create", &system);
    let env = Connector::env_for(&fixed);
    let (code, out) = dead_letters(&env, &["list"]);
    assert_eq!(code, 0, "{out}");
    println!("{out}");
    let line = out.lines().find(|l| l.contains("missing-value")).unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains(&format!(" {} ", msgs.len())) && line.contains("timestampExpression"), "{line}");
    until("list removes nothing", Duration::from_secs(30), all_dead).await;

    let (code, out) = dead_letters(&env, &["redrive", "--kind", "fhir-rejected", "--dry-run"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 selected"), "{out}");
    let (code, out) = dead_letters(&env, &["redrive", "--dry-run"]);
    assert_eq!(code, 0, "{out}");
    println!("{out}");
    assert!(out.contains(&format!("would now pass the mappings: {}", msgs.len())), "{out}");
    assert!(out.contains("dry run: nothing moved"), "{out}");
    until("a dry run moves nothing", Duration::from_secs(30), all_dead).await;

    let c = Connector::start(&fixed).await;
    let (code, out) = dead_letters(&env, &["redrive", "--kind", "missing-value"]);
    assert_eq!(code, 0, "{out}");
    println!("{out}");
    assert!(out.contains(&format!("moved {} back", msgs.len())), "{out}");
    c.wait_acked(msgs.len() as f64, Duration::from_secs(60)).await;
    until("the dead-letter queue emptied", Duration::from_secs(30), || async {
        services::queue_counts(&dlq) == (0, 0)
    })
    .await;
    let fhir = Fhir::new();
    for d in 0..3 {
        let obs = fhir.search(&format!("Observation?subject=Patient/{}", patient_id(&run, d))).await;
        assert_eq!(obs.len(), 1, "device {d}");
        let want: std::collections::BTreeMap<usize, String> = (0..10).map(|i| (i, hr(d, i).to_string())).collect();
        assert_eq!(decode(&obs[0]["valueSampledData"]), want, "device {d}: every redriven reading");
    }
    assert_converged(&fhir, &run, 3, &uninterrupted(&msgs, &system)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn queues_are_quorum_by_default_and_an_existing_classic_queue_is_used_as_it_is() {
    let _one = ONE_AT_A_TIME.lock().await;
    services::require_fhir().await;
    let run = services::unique("qtype");
    let system = format!("urn:iomt-test:{run}");
    let (fresh, classic) = (format!("{run}.fresh"), format!("{run}.classic"));

    let c = Connector::start(&Setup::new(&fresh, "Create", &system)).await;
    assert_eq!(services::queue_type(&fresh), "quorum");
    assert_eq!(services::queue_type(&format!("{fresh}.dlq")), "quorum");
    assert!(!c.log().contains("already exists"), "{}", c.log());
    drop(c);

    let conn = services::broker().await;
    let ch = conn.create_channel().await.unwrap_or_else(|e| panic!("{e}"));
    services::declare_classic(&ch, &classic).await;
    let c = Connector::start(&Setup::new(&classic, "Create", &system)).await;
    assert_eq!(services::queue_type(&classic), "classic");
    let log = c.log();
    assert!(log.contains(&format!("queue '{classic}' already exists")) && log.contains("quorum"), "{log}");
    let msgs = bodies(&run, 2, 3, &[Vital::HeartRate]);
    services::publish(&ch, &classic, &msgs).await;
    c.wait_acked(msgs.len() as f64, Duration::from_secs(60)).await;
    for q in [fresh.clone(), format!("{fresh}.dlq"), classic.clone(), format!("{classic}.dlq")] {
        services::delete_queue(&ch, &q).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_taken_http_port_is_a_clear_error_and_exit_1_without_a_panic() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let addr = taken.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let setup = Setup::new("unused", "Create", "urn:x");
    let mut env = Connector::env_for(&setup);
    env.push(("IOMT_HTTP__LISTEN".into(), addr.clone()));
    let mut c = Connector::spawn_env(env);
    assert_eq!(c.wait(Duration::from_secs(30)).await, Some(1), "{}", c.log());
    let log = c.log();
    assert!(log.contains(&format!("cannot listen on {addr} (http.listen)")), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_returned_past_the_delivery_limit_is_dead_lettered_by_the_broker() {
    let _one = ONE_AT_A_TIME.lock().await;
    let run = services::unique("limit");
    let queue = format!("{run}.q");
    let conn = services::broker().await;
    let mut b = services::broker_settings(&queue);
    b.delivery_limit = 2;
    let warnings = iomt_connector::source::rabbitmq::declare(&conn, &b).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(warnings.is_empty(), "{warnings:?}");
    let ch = conn.create_channel().await.unwrap_or_else(|e| panic!("{e}"));
    let msg = bodies(&run, 1, 1, &[Vital::HeartRate]);
    services::publish(&ch, &queue, &msg).await;
    // What a process that keeps crashing on the message does to it: take it, never ack it.
    for _ in 0..3 {
        let got = ch
            .basic_get(queue.as_str().into(), lapin::options::BasicGetOptions { no_ack: false })
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("the message is back in the queue"));
        let requeue = lapin::options::BasicNackOptions { requeue: true, ..Default::default() };
        got.delivery.acker.nack(requeue).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let dlq = format!("{queue}.dlq");
    until("dead-lettered by the broker", Duration::from_secs(30), || async {
        services::ready_count(&ch, &dlq).await == 1
    })
    .await;
    let mut env = vec![("IOMT_BROKER__QUEUE".to_string(), queue.clone())];
    env.push(("IOMT_BROKER__DEAD_LETTER_QUEUE".into(), dlq.clone()));
    let (code, out) = dead_letters(&env, &["list"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("delivery-limit") && out.contains("broker.delivery_limit"), "{out}");
    for q in [queue, dlq] {
        services::delete_queue(&ch, &q).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_identifier_is_dead_lettered_at_once_and_every_other_device_is_written() {
    let _one = ONE_AT_A_TIME.lock().await;
    services::require_fhir().await;
    let o = outage_of("poison", 40, 3).await;
    let mut c = o.connector(services::fhir_url(), &[]).await;
    let Outage { run, system, queue, msgs, conn } = &o;
    let ch = conn.create_channel().await.unwrap_or_else(|e| panic!("{e}"));
    // A 70,000-character device id: no search URL can carry it, no server would take it.
    let mut poison: Value = serde_json::from_slice(&msgs[0]).unwrap_or_else(|e| panic!("{e}"));
    poison["deviceId"] = Value::String("x".repeat(70_000));
    let poison = serde_json::to_vec(&poison).unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    services::publish(&ch, queue, &[poison]).await;
    services::publish(&ch, queue, msgs).await;
    c.wait_acked((msgs.len() + 1) as f64, Duration::from_secs(120)).await;
    let took = started.elapsed().as_secs_f64();
    // The dead letter is booked just after its ack.
    let poisoned = || async { c.metric("iomt_dead_lettered_total{kind=\"identifier-too-long\"}").await == 1.0 };
    if tokio::time::timeout(Duration::from_secs(10), async {
        while !poisoned().await {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .is_err()
    {
        let m = c.metrics().await;
        let dead: Vec<_> = m.iter().filter(|(k, _)| k.contains("dead_lettered") || k.contains("acked")).collect();
        panic!("the poison message is not booked as identifier-too-long: {dead:?}");
    }
    println!(
        "a 70,000-character device id among 40 devices: dead-lettered, and all {} messages acked, in {took:.1} s",
        msgs.len() + 1
    );
    assert_eq!(services::ready_count(&ch, &format!("{queue}.dlq")).await, 1);
    assert_converged(&Fhir::new(), run, 40, &uninterrupted(msgs, system)).await;
    let stopping = Instant::now();
    c.signal("TERM");
    assert_eq!(
        c.wait(Duration::from_secs(15)).await,
        Some(0),
        "SIGTERM ends at once: {}",
        services::tail(&c.log(), 10)
    );
    println!("SIGTERM → exit 0 in {:.1} s", stopping.elapsed().as_secs_f64());
}

/// The connector's resident memory, in MiB.
fn rss_mib(c: &Connector) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", c.pid())).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

#[tokio::test(flavor = "multi_thread")]
async fn large_messages_during_an_outage_stay_within_the_byte_budget_and_are_all_written_after() {
    let _one = ONE_AT_A_TIME.lock().await;
    services::require_fhir().await;
    let proxy = FaultProxy::start(&services::fhir_url()).await;
    let o = outage("budget", 1).await;
    let Outage { run, system, queue, conn, .. } = &o;
    // 40 devices, one heart rate each, padded to 5 MiB.
    let msgs: Vec<Vec<u8>> = bodies(run, 40, 1, &[Vital::HeartRate])
        .into_iter()
        .map(|b| {
            let mut v: Value = serde_json::from_slice(&b).unwrap_or_else(|e| panic!("{e}"));
            v["padding"] = Value::String("x".repeat(5 << 20));
            serde_json::to_vec(&v).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let budget: usize = 32 << 20;
    let c = o
        .connector(
            proxy.url(&services::fhir_url()),
            &[
                ("IOMT_PIPELINE__MAX_IN_FLIGHT_BYTES", &budget.to_string()),
                ("IOMT_PIPELINE__MAX_MESSAGE_BYTES", "8388608"),
            ],
        )
        .await;
    let idle = rss_mib(&c);
    proxy.mode("garbage").await;
    let ch = conn.create_channel().await.unwrap_or_else(|e| panic!("{e}"));
    services::publish(&ch, queue, &msgs).await;
    // 20 s of outage: what the connector holds never passes the budget; the broker keeps the rest.
    let (mut peak_bytes, mut peak_rss) = (0.0f64, 0.0f64);
    let outage_ends = Instant::now() + Duration::from_secs(20);
    while Instant::now() < outage_ends {
        peak_bytes = peak_bytes.max(c.metric("iomt_in_flight_bytes").await);
        peak_rss = peak_rss.max(rss_mib(&c));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let waiting = services::ready_count(&ch, queue).await;
    println!(
        "40 messages of 5 MiB during an outage, budget 32 MiB: at most {:.1} MiB in flight, {waiting} left on the broker; RSS {idle:.0} MiB idle, at most {peak_rss:.0} MiB",
        peak_bytes / f64::from(1 << 20)
    );
    assert!(peak_bytes > 0.0, "messages were taken");
    assert!(peak_bytes <= budget as f64, "in flight {peak_bytes} bytes, over the budget of {budget}");
    assert!(waiting > 0, "the broker keeps what the budget does not hold");
    assert_eq!(c.metric("iomt_messages_acked_total").await, 0.0, "nothing acked during the outage");
    proxy.mode("pass").await;
    c.wait_acked(msgs.len() as f64, Duration::from_secs(180)).await;
    assert_nothing_dead_lettered(&c, queue).await;
    assert_converged(&Fhir::new(), run, 40, &uninterrupted(&msgs, system)).await;
    // Larger than pipeline.max_message_bytes: dead-lettered as it came, never parsed.
    let mut huge = msgs[0].clone();
    huge.extend(std::iter::repeat_n(b' ', 4 << 20));
    services::publish(&ch, queue, &[huge]).await;
    c.wait_acked((msgs.len() + 1) as f64, Duration::from_secs(60)).await;
    let too_large = || async { c.metric("iomt_dead_lettered_total{kind=\"message-too-large\"}").await == 1.0 };
    until("the message over pipeline.max_message_bytes dead-lettered", Duration::from_secs(10), too_large).await;
    assert_eq!(services::ready_count(&ch, &format!("{queue}.dlq")).await, 1);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_an_outage_ends_within_the_shutdown_timeout_and_leaves_the_held_messages_to_the_broker() {
    let _one = ONE_AT_A_TIME.lock().await;
    services::require_fhir().await;
    let proxy = FaultProxy::start(&services::fhir_url()).await;
    let o = outage("termheld", 2).await;
    let Outage { queue, msgs, conn, .. } = &o;
    let mut c = o.connector(proxy.url(&services::fhir_url()), &[("IOMT_PIPELINE__SHUTDOWN_TIMEOUT_SECS", "15")]).await;
    proxy.mode("garbage").await;
    let ch = conn.create_channel().await.unwrap_or_else(|e| panic!("{e}"));
    services::publish(&ch, queue, msgs).await;
    assert_holding(&c, queue).await;
    let stopping = Instant::now();
    c.signal("TERM");
    let code = c.wait(Duration::from_secs(30)).await;
    let took = stopping.elapsed().as_secs_f64();
    let log = c.log();
    println!("SIGTERM during an outage: exit {code:?} in {took:.1} s (pipeline.shutdown_timeout_secs = 15)");
    assert_eq!(code, Some(1), "held messages unwritten: exit 1; log:\n{}", services::tail(&log, 10));
    assert!(took <= 16.0, "the stop took {took:.1} s, past pipeline.shutdown_timeout_secs");
    assert!(log.contains("will redeliver"), "{}", services::tail(&log, 10));
    proxy.mode("pass").await;
    // Nothing was acked or dead-lettered: every message is back on the broker for the next instance.
    let back = || async { services::ready_count(&ch, queue).await as usize == msgs.len() };
    until("every message back on the broker", Duration::from_secs(30), back).await;
    assert_eq!(services::queue_counts(&format!("{queue}.dlq")), (0, 0));
    proxy.stop().await;
}
