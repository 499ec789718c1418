//! The real services the pipeline tests run against, and the connector run as a process.
//! RabbitMQ: `IOMT_TEST_AMQP_URL` (default amqp://guest:guest@127.0.0.1:5672/%2f).
//! FHIR: `IOMT_TEST_FHIR_URL` (default http://127.0.0.1:8090/fhir, started by scripts/setup.sh).
//! A missing service fails the test with what to run; nothing is skipped.

#![allow(dead_code)]

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

pub fn amqp_url() -> String {
    std::env::var("IOMT_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn fhir_url() -> String {
    std::env::var("IOMT_TEST_FHIR_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:8090/fhir".into())
        .trim_end_matches('/')
        .to_string()
}

/// A name unique to this test run, for queues, identifier systems and ids.
pub fn unique(test: &str) -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    format!("{test}-{}-{}", std::process::id(), nanos % 1_000_000_000_000)
}

pub async fn broker() -> Connection {
    let url = amqp_url();
    let connect = Connection::connect(&url, ConnectionProperties::default());
    match tokio::time::timeout(BROKER_PATIENCE, connect).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!("RabbitMQ is not reachable at {} ({e}): run scripts/setup.sh", amqp_url()),
        Err(_) => panic!(
            "RabbitMQ at {} did not complete a connection in {BROKER_PATIENCE:?}; {}",
            amqp_url(),
            broker_state()
        ),
    }
}

/// How long a test waits on the broker for one step before it fails (instead of hanging CI).
pub const BROKER_PATIENCE: Duration = Duration::from_secs(120);

/// What the broker says of its resource alarms (a memory or disk alarm blocks every publisher,
/// which from a test looks like a confirm that never comes).
pub fn broker_state() -> String {
    let alarms = std::process::Command::new("rabbitmq-diagnostics").args(["-q", "alarms"]).output();
    let alarms = match alarms {
        Ok(o) => format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
        Err(e) => format!("(rabbitmq-diagnostics: {e})"),
    };
    format!("the broker's alarms: {}", alarms.trim())
}

/// Awaits a broker step with `BROKER_PATIENCE`, failing with what the broker says when it lapses.
pub async fn patiently<T>(what: &str, step: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(BROKER_PATIENCE, step).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer from the broker in {BROKER_PATIENCE:?}; {}", broker_state()),
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap_or_else(|e| panic!("{e}"))
}

pub async fn require_fhir() {
    let url = format!("{}/metadata", fhir_url());
    match http().get(&url).send().await {
        Ok(r) if r.status().is_success() => {}
        other => panic!("the FHIR server is not answering at {url} ({other:?}): run scripts/setup.sh"),
    }
}

/// Publishes JSON bodies with publisher confirms, many in flight, stamping the send time.
pub async fn publish(channel: &Channel, queue: &str, bodies: &[Vec<u8>]) {
    publish_routed(channel, "", bodies.iter().map(|b| (queue.to_string(), b))).await
}

/// Publishes `(routing key, body)` pairs to `exchange`, as `publish` does.
pub async fn publish_routed<'a>(
    channel: &Channel,
    exchange: &str,
    messages: impl Iterator<Item = (String, &'a Vec<u8>)>,
) {
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap_or_else(|e| panic!("{e}"));
    let mut pending = Vec::with_capacity(256);
    for (routing_key, b) in messages {
        let sent = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        let mut h = FieldTable::default();
        h.insert("x-iomt-sent-at".into(), AMQPValue::LongLongInt(sent));
        let props = BasicProperties::default().with_headers(h).with_delivery_mode(2);
        let publish = channel.basic_publish(
            exchange.into(),
            routing_key.as_str().into(),
            BasicPublishOptions::default(),
            b,
            props,
        );
        let confirm = patiently("publish", publish).await.unwrap_or_else(|e| panic!("publish: {e}"));
        pending.push(confirm);
        if pending.len() >= 256 {
            for c in pending.drain(..) {
                patiently("publisher confirm", c).await.unwrap_or_else(|e| panic!("confirm: {e}"));
            }
        }
    }
    for c in pending {
        patiently("publisher confirm", c).await.unwrap_or_else(|e| panic!("confirm: {e}"));
    }
}

/// The broker settings a test's connector runs with (`Connector::env_for`): the defaults, with the
/// test's queue and its own dead-letter exchange and queue.
pub fn broker_settings(queue: &str) -> iomt_connector::config::Broker {
    let mut b = iomt_connector::config::Settings::load_broker(None).unwrap_or_else(|e| panic!("{e}"));
    b.url = amqp_url();
    b.queue = queue.to_string();
    b.dead_letter_exchange = format!("{queue}.dlx");
    b.dead_letter_queue = format!("{queue}.dlq");
    b
}

/// Declares the test's queues exactly as its connector will (so messages published before the
/// connector starts are kept, and the connector finds what it would have declared).
pub async fn declare(conn: &Connection, queue: &str) {
    let warnings = iomt_connector::source::rabbitmq::declare(conn, &broker_settings(queue))
        .await
        .unwrap_or_else(|e| panic!("declare {queue}: {e}"));
    assert!(warnings.is_empty(), "{warnings:?}");
}

/// A classic durable queue, as an older deployment (or another tool) would have declared it.
pub async fn declare_classic(channel: &Channel, queue: &str) {
    let o = QueueDeclareOptions { durable: true, ..Default::default() };
    channel
        .queue_declare(queue.into(), o, FieldTable::default())
        .await
        .unwrap_or_else(|e| panic!("declare {queue}: {e}"));
}

/// `rabbitmqctl ARGS` (the tests run where the broker runs); its stdout.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("rabbitmqctl {args:?} (the broker's own tool, needed by this test): {e}"));
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `(ready, unacked)` of a queue, from the broker itself.
pub fn queue_counts(queue: &str) -> (u64, u64) {
    let text = rabbitmqctl(&["-q", "list_queues", "name", "messages_ready", "messages_unacknowledged"]);
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() == 3 && f[0] == queue).then(|| (f[1].parse().unwrap_or(0), f[2].parse().unwrap_or(0)))
        })
        .next()
        .unwrap_or_else(|| panic!("queue {queue} is not listed:\n{text}"))
}

/// The type (`quorum`, `classic`) of a queue.
pub fn queue_type(queue: &str) -> String {
    let text = rabbitmqctl(&["-q", "list_queues", "name", "type"]);
    text.lines()
        .filter_map(|l| l.split_once('\t'))
        .find(|(name, _)| *name == queue)
        .map(|(_, t)| t.trim().to_string())
        .unwrap_or_else(|| panic!("queue {queue} is not listed:\n{text}"))
}

/// Where scripts/setup.sh keeps this machine's test CA and certificates (docs/tls.md).
pub fn tls_dir() -> PathBuf {
    std::env::var_os("IOMT_TEST_TLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/iomt-connector-test/tls"))
}

/// The repository's `scripts/` (or `.services/`) path.
pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A FHIR server of a test's own (sekmet, as scripts/fhir-server.sh runs it, on `port`), for tests
/// that stop and start it.
pub struct OwnFhirServer {
    pub port: u16,
}

impl OwnFhirServer {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/fhir", self.port)
    }

    pub fn ctl(&self, cmd: &str) {
        let out = std::process::Command::new(repo_path("scripts/fhir-server.sh"))
            .arg(cmd)
            .env("FHIR_PORT", self.port.to_string())
            .output()
            .unwrap_or_else(|e| panic!("scripts/fhir-server.sh {cmd}: {e}"));
        assert!(
            out.status.success(),
            "scripts/fhir-server.sh {cmd} (FHIR_PORT={}): {}{}",
            self.port,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// mitmproxy with tests/support/fault_proxy.py, in front of `upstream` (installed by
/// scripts/setup.sh): a real proxy that can make the FHIR server hang or answer 429/503.
pub struct FaultProxy {
    child: Child,
    pub port: u16,
}

impl FaultProxy {
    pub async fn start(upstream: &str) -> FaultProxy {
        let mitmdump = repo_path(".services/mitm-venv/bin/mitmdump");
        assert!(mitmdump.is_file(), "{} is missing: run scripts/setup.sh", mitmdump.display());
        let port = free_port();
        let u = reqwest::Url::parse(upstream).unwrap_or_else(|e| panic!("{upstream}: {e}"));
        let origin = format!("{}://{}:{}/", u.scheme(), u.host_str().unwrap_or("127.0.0.1"), u.port().unwrap_or(80));
        let log = std::fs::File::create(std::env::temp_dir().join(format!("fault-proxy-{port}.log")))
            .unwrap_or_else(|e| panic!("{e}"));
        let child = Command::new(mitmdump)
            .args(["--mode", &format!("reverse:{origin}"), "--listen-host", "127.0.0.1", "-p", &port.to_string()])
            // Connect upstream per request, so the proxy itself answers while the server is away.
            .args(["--set", "connection_strategy=lazy", "-q", "-s"])
            .arg(repo_path("tests/support/fault_proxy.py"))
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start mitmdump: {e}"));
        let p = FaultProxy { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while http().get(p.control("log")).send().await.is_err() {
            assert!(Instant::now() < deadline, "the fault proxy did not answer in 60 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        p
    }

    fn control(&self, what: &str) -> String {
        format!("http://127.0.0.1:{}/__fault/{what}", self.port)
    }

    /// The FHIR base URL through the proxy.
    pub fn url(&self, upstream: &str) -> String {
        let path = reqwest::Url::parse(upstream).map(|u| u.path().to_string()).unwrap_or_default();
        format!("http://127.0.0.1:{}{}", self.port, path.trim_end_matches('/'))
    }

    async fn call(&self, what: &str) -> Value {
        let r = http().get(self.control(what)).send().await.unwrap_or_else(|e| panic!("fault proxy {what}: {e}"));
        r.json().await.unwrap_or_else(|e| panic!("fault proxy {what}: {e}"))
    }

    /// `pass` or `hang`.
    pub async fn mode(&self, mode: &str) {
        self.call(&format!("mode?set={mode}")).await;
    }

    /// The next `count` requests of `methods` (e.g. "PUT,POST") are answered `status` with
    /// `Retry-After: retry_after`.
    pub async fn inject(&self, status: u16, retry_after: u64, count: u32, methods: &str) {
        self.call(&format!("inject?status={status}&retry_after={retry_after}&count={count}&methods={methods}")).await;
    }

    /// Every request the proxy saw: `{"t", "method", "path", "injected"}`.
    pub async fn log(&self) -> Vec<Value> {
        self.call("log").await["log"].as_array().cloned().unwrap_or_default()
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

pub async fn ready_count(channel: &Channel, queue: &str) -> u32 {
    let o = QueueDeclareOptions { passive: true, ..Default::default() };
    channel.queue_declare(queue.into(), o, FieldTable::default()).await.map(|q| q.message_count()).unwrap_or(0)
}

pub async fn delete_queue(channel: &Channel, queue: &str) {
    let _ = channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await;
}

/// Every message in a queue: (headers as text, body).
pub async fn drain(channel: &Channel, queue: &str) -> Vec<(HashMap<String, String>, Vec<u8>)> {
    let mut out = Vec::new();
    while let Ok(Some(m)) = channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await {
        let headers = m
            .delivery
            .properties
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .iter()
                    .map(|(k, v)| {
                        let text = match v {
                            AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                            other => format!("{other:?}"),
                        };
                        (k.as_str().to_string(), text)
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push((headers, m.delivery.data.clone()));
    }
    out
}

/// The connector, run as a user runs it.
pub struct Connector {
    pub child: Option<Child>,
    pub http: String,
    pub env: Vec<(String, String)>,
    stderr_log: PathBuf,
}

pub struct Setup<'a> {
    pub queue: &'a str,
    pub mode: &'a str,
    pub device_system: &'a str,
    pub device_mapping: PathBuf,
    pub fhir_mapping: PathBuf,
    pub extra: Vec<(&'a str, String)>,
}

impl<'a> Setup<'a> {
    pub fn new(queue: &'a str, mode: &'a str, device_system: &'a str) -> Self {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        Setup {
            queue,
            mode,
            device_system,
            device_mapping: repo.join("mappings/devicecontent.json"),
            fhir_mapping: repo.join("mappings/fhirmapping.json"),
            extra: Vec::new(),
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"))
}

impl Connector {
    pub fn env_for(s: &Setup<'_>) -> Vec<(String, String)> {
        let mut env = vec![
            ("IOMT_BROKER__URL".to_string(), amqp_url()),
            ("IOMT_BROKER__QUEUE".into(), s.queue.to_string()),
            ("IOMT_BROKER__DEAD_LETTER_EXCHANGE".into(), format!("{}.dlx", s.queue)),
            ("IOMT_BROKER__DEAD_LETTER_QUEUE".into(), format!("{}.dlq", s.queue)),
            ("IOMT_FHIR__BASE_URL".into(), fhir_url()),
            ("IOMT_IDENTITY__MODE".into(), s.mode.to_string()),
            ("IOMT_IDENTITY__DEVICE_IDENTIFIER_SYSTEM".into(), s.device_system.to_string()),
            ("IOMT_MAPPINGS__DEVICE".into(), s.device_mapping.display().to_string()),
            ("IOMT_MAPPINGS__FHIR".into(), s.fhir_mapping.display().to_string()),
            ("IOMT_PIPELINE__FLUSH_INTERVAL_MS".into(), "300".into()),
            ("IOMT_LOG__LEVEL".into(), "info".into()),
        ];
        for (k, v) in &s.extra {
            env.push((k.to_string(), v.clone()));
        }
        env
    }

    pub async fn start(s: &Setup<'_>) -> Connector {
        Connector::start_env(Connector::env_for(s)).await
    }

    /// Starts it and returns at once, ready or not (for a start that is expected to fail).
    pub fn spawn_env(env: Vec<(String, String)>) -> Connector {
        let port = free_port();
        let http = format!("127.0.0.1:{port}");
        let stderr_log = std::env::temp_dir().join(format!("iomt-connector-{port}.log"));
        let log = std::fs::File::create(&stderr_log).unwrap_or_else(|e| panic!("{e}"));
        let child = Command::new(env!("CARGO_BIN_EXE_iomt-connector"))
            .arg("run")
            .env("IOMT_HTTP__LISTEN", &http)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start iomt-connector: {e}"));
        Connector { child: Some(child), http, env, stderr_log }
    }

    pub async fn start_env(env: Vec<(String, String)>) -> Connector {
        let c = Connector::spawn_env(env);
        c.wait_ready().await;
        c
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = None;
        loop {
            if let Ok(r) = http().get(format!("http://{}/health/ready", self.http)).send().await {
                if r.status().is_success() {
                    return;
                }
                last = r.text().await.ok();
            }
            if Instant::now() > deadline {
                panic!(
                    "the connector did not become ready in 60 s; /health/ready said {last:?}; {}; its log:\n{}",
                    broker_state(),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        match http().get(format!("http://{}{path}", self.http)).send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.text().await.unwrap_or_default())
            }
            Err(e) => panic!("GET {path}: {e}\n{}", self.log()),
        }
    }

    /// The unlabelled and labelled samples of `/metrics`, by their full text name.
    pub async fn metrics(&self) -> HashMap<String, f64> {
        let (_, text) = self.get("/metrics").await;
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    pub async fn metric(&self, name: &str) -> f64 {
        self.metrics().await.get(name).copied().unwrap_or(0.0)
    }

    /// Waits until `acked` messages are acked and none is in flight.
    pub async fn wait_acked(&self, acked: f64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.metrics().await;
            let done = m.get("iomt_messages_acked_total").copied().unwrap_or(0.0);
            let unacked = m.get("iomt_unacked_messages").copied().unwrap_or(0.0);
            if done >= acked && unacked == 0.0 {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "acked {done} of {acked} (unacked {unacked}) after {timeout:?}; log:\n{}",
                    tail(&self.log(), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().and_then(|c| c.id()).map(|p| p as i32).unwrap_or_else(|| panic!("not running"))
    }

    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .map(|s| s.success());
        assert_eq!(ok.ok(), Some(true), "kill -{sig}");
    }

    /// Waits for the process to end; its exit code.
    pub async fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) => status.code(),
            _ => {
                let _ = child.kill().await;
                panic!("the connector did not exit within {timeout:?}; log:\n{}", tail(&self.log(), 40));
            }
        }
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// FHIR reads for the assertions (never through the connector's own client).
pub struct Fhir {
    pub base: String,
    client: reqwest::Client,
}

impl Fhir {
    pub fn new() -> Fhir {
        Fhir::at(&fhir_url())
    }

    pub fn at(base: &str) -> Fhir {
        Fhir { base: base.trim_end_matches('/').to_string(), client: http() }
    }

    pub async fn get(&self, path: &str) -> Option<Value> {
        let r =
            self.client.get(format!("{}/{path}", self.base)).send().await.unwrap_or_else(|e| panic!("GET {path}: {e}"));
        if r.status().as_u16() == 404 || r.status().as_u16() == 410 {
            return None;
        }
        assert!(r.status().is_success(), "GET {path}: HTTP {}", r.status());
        Some(r.json().await.unwrap_or_else(|e| panic!("GET {path}: {e}")))
    }

    /// Every resource a search matches, following `next` links.
    pub async fn search(&self, query: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut url = format!("{}/{query}{}_count=200", self.base, if query.contains('?') { "&" } else { "?" });
        loop {
            let r = self.client.get(&url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
            assert!(r.status().is_success(), "GET {url}: HTTP {}", r.status());
            let b: Value = r.json().await.unwrap_or_else(|e| panic!("{e}"));
            for e in b["entry"].as_array().into_iter().flatten() {
                out.push(e["resource"].clone());
            }
            let next = b["link"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|l| l["relation"] == "next")
                .and_then(|l| l["url"].as_str());
            match next {
                Some(n) => url = n.to_string(),
                None => return out,
            }
        }
    }

    /// Whether the server refuses an invalid resource (an empty string value, which FHIR forbids).
    /// sekmet validates what it stores and answers 400; helios-hfs stores it as sent. `probe_id`
    /// names the Observation written when the server does not validate.
    pub async fn validates(&self, probe_id: &str) -> bool {
        let probe = serde_json::json!({"resourceType": "Observation", "id": probe_id, "status": "final",
                                       "code": {"text": "validation probe"}, "valueString": ""});
        let r = self
            .client
            .put(format!("{}/Observation/{probe_id}", self.base))
            .header("Content-Type", "application/fhir+json")
            .json(&probe)
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT Observation/{probe_id}: {e}"));
        match r.status().as_u16() {
            400 | 422 => true,
            s if (200..300).contains(&s) => false,
            s => panic!("PUT Observation/{probe_id} (validation probe): unexpected HTTP {s}"),
        }
    }

    pub async fn put(&self, path: &str, body: &Value) {
        let r = self
            .client
            .put(format!("{}/{path}", self.base))
            .header("Content-Type", "application/fhir+json")
            .json(body)
            .send()
            .await;
        let r = r.unwrap_or_else(|e| panic!("PUT {path}: {e}"));
        assert!(r.status().is_success(), "PUT {path}: HTTP {}: {}", r.status(), r.text().await.unwrap_or_default());
    }
}

/// Consumes a whole queue's stream until it has been quiet for a moment (for dead-letter queues
/// a consumer is simpler than polling).
pub async fn collect(
    channel: &Channel,
    queue: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<(HashMap<String, String>, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < expected && Instant::now() < deadline {
        out.extend(drain(channel, queue).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    out
}

/// The sample device mapping with the heart-rate template's timestamp read from a field the
/// messages do not have: every heart-rate message fails with `missing-value`.
pub fn broken_device_mapping(run: &str) -> PathBuf {
    let text = std::fs::read_to_string(repo_path("mappings/devicecontent.json")).unwrap_or_default();
    let mut mapping: Value = serde_json::from_str(&text).unwrap_or_default();
    for t in mapping["template"].as_array_mut().into_iter().flatten() {
        if t["template"]["typeName"] == "heartrate" {
            t["template"]["timestampExpression"] = "$.matchedToken.measuredAt".into();
        }
    }
    let path = std::env::temp_dir().join(format!("{run}-broken-device.json"));
    std::fs::write(&path, mapping.to_string()).unwrap_or_else(|e| panic!("{e}"));
    path
}

/// `iomt-connector dead-letters ARGS` with a connector's settings; (exit code, stdout).
pub fn dead_letters(env: &[(String, String)], args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_iomt-connector"))
        .arg("dead-letters")
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.code().is_some(), "{}", String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), stdout + &String::from_utf8_lossy(&out.stderr))
}

/// A test's own run id, identifier system and queue (declared), with the broker channel.
pub struct Bed {
    pub run: String,
    pub system: String,
    pub queue: String,
    pub ch: lapin::Channel,
    pub _conn: lapin::Connection,
}

pub async fn bed(name: &str) -> Bed {
    require_fhir().await;
    let run = unique(name);
    let system = format!("urn:iomt-test:{run}");
    let queue = format!("{run}.q");
    let conn = broker().await;
    let ch = conn.create_channel().await.unwrap_or_else(|e| panic!("{e}"));
    declare(&conn, &queue).await;
    Bed { run, system, queue, ch, _conn: conn }
}
