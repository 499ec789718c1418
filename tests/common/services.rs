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
    match Connection::connect(&amqp_url(), ConnectionProperties::default()).await {
        Ok(c) => c,
        Err(e) => panic!("RabbitMQ is not reachable at {} ({e}): run scripts/setup.sh", amqp_url()),
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
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap_or_else(|e| panic!("{e}"));
    let mut pending = Vec::with_capacity(256);
    for b in bodies {
        let sent = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        let mut h = FieldTable::default();
        h.insert("x-iomt-sent-at".into(), AMQPValue::LongLongInt(sent));
        let props = BasicProperties::default().with_headers(h).with_delivery_mode(2);
        let confirm = channel
            .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), b, props)
            .await
            .unwrap_or_else(|e| panic!("publish: {e}"));
        pending.push(confirm);
        if pending.len() >= 256 {
            for c in pending.drain(..) {
                c.await.unwrap_or_else(|e| panic!("confirm: {e}"));
            }
        }
    }
    for c in pending {
        c.await.unwrap_or_else(|e| panic!("confirm: {e}"));
    }
}

pub async fn declare(channel: &Channel, queue: &str) {
    let o = QueueDeclareOptions { durable: true, ..Default::default() };
    channel
        .queue_declare(queue.into(), o, FieldTable::default())
        .await
        .unwrap_or_else(|e| panic!("declare {queue}: {e}"));
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

    pub async fn start_env(env: Vec<(String, String)>) -> Connector {
        let port = free_port();
        let http = format!("127.0.0.1:{port}");
        let stderr_log = std::env::temp_dir().join(format!("iomt-connector-{port}.log"));
        let log = std::fs::File::create(&stderr_log).unwrap_or_else(|e| panic!("{e}"));
        let child = Command::new(env!("CARGO_BIN_EXE_iomt-connector"))
            .arg("run")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("IOMT_HTTP__LISTEN", &http)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start iomt-connector: {e}"));
        let c = Connector { child: Some(child), http, env, stderr_log };
        c.wait_ready().await;
        c
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http().get(format!("http://{}/health/ready", self.http)).send().await
                && r.status().is_success()
            {
                return;
            }
            if Instant::now() > deadline {
                panic!("the connector did not become ready in 30 s; its log:\n{}", self.log());
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

    fn pid(&self) -> i32 {
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
        Fhir { base: fhir_url(), client: http() }
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
