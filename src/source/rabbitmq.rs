//! RabbitMQ (AMQP 0-9-1, `lapin`): the evaluation envelope of a delivery, the queue topology,
//! dead-lettering, reading the dead-letter queue, and a confirming publisher. The consumer and its
//! acks are in `rabbitmq/consumer.rs`. No lapin type leaves these two files.

mod consumer;
mod offline;
pub mod settings;
pub mod tls;

pub use consumer::{Running, start};

/// `source.kind = "rabbitmq"`: the `[broker]` section's queue (or shard queues).
pub struct Rabbitmq(pub Broker);

#[async_trait::async_trait(?Send)]
impl crate::source::Source for Rabbitmq {
    fn kind(&self) -> &'static str {
        "rabbitmq"
    }

    fn reads(&self) -> String {
        self.0.queue.clone()
    }

    fn in_flight_bound(&self) -> usize {
        self.0.prefetch as usize
    }

    fn start(
        self: Box<Self>,
        intake: std::sync::Arc<dyn crate::source::Intake>,
        shared: std::sync::Arc<crate::status::Shared>,
    ) -> Box<dyn crate::source::Running> {
        Box::new(start(self.0, intake, shared))
    }

    async fn publisher(&self, in_flight: usize) -> Result<Box<dyn crate::source::Publish>, String> {
        offline::publisher(self.broker(), in_flight).await
    }

    async fn dead_letters(&self) -> Result<Box<dyn crate::source::DeadLetters>, String> {
        offline::dead_letters(self.broker()).await
    }
}

use crate::source::Failure;
use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use serde_json::{Map, Value, json};
use settings::{Broker, QueueType, Topology};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What went wrong talking to RabbitMQ (the broker's or the client's own words).
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{0}")]
    Amqp(#[from] lapin::Error),
    #[error("broker.topology = \"sharded\" routes messages by device id: give one (publish --routing-key)")]
    NoDeviceId,
    #[error("{0}")]
    Topology(String),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
}

/// The header a sender may stamp with its send time (epoch milliseconds) to measure end-to-end
/// delay; AMQP's own timestamp has only second resolution.
pub const SENT_AT_HEADER: &str = "x-iomt-sent-at";
pub const ERROR_KIND_HEADER: &str = "x-iomt-error-kind";
pub const ERROR_HEADER: &str = "x-iomt-error";

/// `{"Body": <JSON body>, "Properties": {<headers>}, "SystemProperties": {<broker properties>}}`,
/// the document MedTech templates are written against. `Err` when the body is not JSON.
pub fn envelope(
    body: &[u8],
    props: &BasicProperties,
    exchange: &str,
    routing_key: &str,
    redelivered: bool,
) -> Result<Value, String> {
    let body = crate::source::body_json(body, "message")?;
    let properties = props.headers().as_ref().map(table_map).unwrap_or_default();
    let mut system = Map::new();
    let mut put = |k: &str, v: &Option<ShortString>| {
        if let Some(v) = v {
            system.insert(k.to_string(), Value::String(v.as_str().to_string()));
        }
    };
    put("message-id", props.message_id());
    put("correlation-id", props.correlation_id());
    put("content-type", props.content_type());
    put("content-encoding", props.content_encoding());
    put("type", props.kind());
    put("user-id", props.user_id());
    put("app-id", props.app_id());
    if let Some(ts) = props.timestamp()
        && let Some(t) = i64::try_from(*ts).ok().and_then(|s| chrono::DateTime::from_timestamp(s, 0))
    {
        system.insert("timestamp".into(), Value::String(crate::model::time::millis(t)));
    }
    system.insert("exchange".into(), Value::String(exchange.to_string()));
    system.insert("routing-key".into(), Value::String(routing_key.to_string()));
    system.insert("redelivered".into(), Value::Bool(redelivered));
    Ok(crate::source::envelope(body, properties, system))
}

fn table_map(t: &FieldTable) -> Map<String, Value> {
    t.inner().iter().map(|(k, v)| (k.as_str().to_string(), amqp_json(v))).collect()
}

fn amqp_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(i) => json!(i),
        AMQPValue::ShortShortUInt(i) => json!(i),
        AMQPValue::ShortInt(i) => json!(i),
        AMQPValue::ShortUInt(i) => json!(i),
        AMQPValue::LongInt(i) => json!(i),
        AMQPValue::LongUInt(i) => json!(i),
        AMQPValue::LongLongInt(i) => json!(i),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => json!(d.value as f64 / 10f64.powi(d.scale as i32)),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_json).collect()),
        AMQPValue::Timestamp(t) => i64::try_from(*t)
            .ok()
            .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
            .map_or(Value::Null, |t| json!(crate::model::time::millis(t))),
        AMQPValue::FieldTable(t) => Value::Object(table_map(t)),
        AMQPValue::ByteArray(_) | AMQPValue::Void => Value::Null,
    }
}

/// When the device sent the message: the `x-iomt-sent-at` header (epoch ms), else the AMQP
/// timestamp (seconds).
pub fn sent_at(props: &BasicProperties) -> Option<SystemTime> {
    let header = props.headers().as_ref().and_then(|h| h.inner().get(SENT_AT_HEADER)).and_then(|v| match v {
        AMQPValue::LongLongInt(i) => u64::try_from(*i).ok(),
        AMQPValue::LongInt(i) => u64::try_from(*i).ok(),
        AMQPValue::LongUInt(i) => Some(*i as u64),
        AMQPValue::Timestamp(t) => Some(*t),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        _ => None,
    });
    match header {
        Some(ms) => UNIX_EPOCH.checked_add(Duration::from_millis(ms)),
        None => props.timestamp().and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s))),
    }
}

/// The arguments the input queue is declared with. Quorum: replicated, and after
/// `broker.delivery_limit` deliveries (a message that keeps crashing the process) the broker itself
/// dead-letters it to the dead-letter exchange, where `dead-letters list` shows it as
/// `delivery-limit`.
pub fn queue_args(b: &Broker) -> FieldTable {
    let mut args = FieldTable::default();
    if b.queue_type == QueueType::Quorum {
        args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
        if b.delivery_limit > 0 {
            args.insert("x-delivery-limit".into(), AMQPValue::LongInt(b.delivery_limit.min(i32::MAX as u32) as i32));
        }
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(b.dead_letter_exchange.clone())),
        );
    }
    args
}

/// The arguments the dead-letter queue is declared with: the same type, no limit.
fn dead_letter_queue_args(b: &Broker) -> FieldTable {
    let mut args = FieldTable::default();
    if b.queue_type == QueueType::Quorum {
        args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
    }
    args
}

/// Declares the queue, the durable fanout dead-letter exchange and the dead-letter queue bound to
/// it. A queue that exists with other arguments (another type, say) is used as it is; the
/// returned warnings say so, with the broker's own words.
pub async fn declare(conn: &Connection, b: &Broker) -> Result<Vec<String>, BrokerError> {
    let mut warnings = Vec::new();
    let channel = conn.create_channel().await?;
    let ex = ExchangeDeclareOptions { durable: true, ..Default::default() };
    match b.topology {
        Topology::Queue => warnings.extend(declare_queue(conn, &b.queue, queue_args(b), b.queue_type).await?),
        Topology::Sharded => {
            let mut args = FieldTable::default();
            if !b.hash_header.is_empty() {
                args.insert("hash-header".into(), AMQPValue::LongString(LongString::from(b.hash_header.clone())));
            }
            let kind = ExchangeKind::Custom("x-consistent-hash".into());
            channel.exchange_declare(b.queue.as_str().into(), kind, ex, args).await?;
            for k in 0..b.shard_queues {
                let q = shard_queue(b, k);
                let mut args = queue_args(b);
                // One consumer at a time, the others standing by: a device's messages are handled
                // by one instance, in order, and a standby takes over when it goes.
                args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
                if let Some(w) = declare_queue(conn, &q, args, b.queue_type).await? {
                    // Without single active consumer several instances would share a shard queue
                    // and a device's messages would be handled in two places at once.
                    return Err(BrokerError::Topology(format!(
                        "shard queue '{q}' exists but not as the sharded topology needs it (x-single-active-consumer, broker.queue_type, broker.delivery_limit): move its messages and delete it, or fix its arguments. {w}"
                    )));
                }
                // Equal weights: each queue gets an equal share of the hash ring.
                let bind = QueueBindOptions::default();
                channel
                    .queue_bind(q.as_str().into(), b.queue.as_str().into(), "1".into(), bind, FieldTable::default())
                    .await?;
            }
        }
    }
    bind_mqtt_topics(&channel, b).await?;
    channel
        .exchange_declare(b.dead_letter_exchange.as_str().into(), ExchangeKind::Fanout, ex, FieldTable::default())
        .await?;
    warnings.extend(declare_queue(conn, &b.dead_letter_queue, dead_letter_queue_args(b), b.queue_type).await?);
    channel
        .queue_bind(
            b.dead_letter_queue.as_str().into(),
            b.dead_letter_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "declared".into()).await;
    Ok(warnings)
}

/// Binds what reads (the queue; sharded: the consistent-hash exchange, exchange to exchange) to
/// `broker.mqtt_exchange` for each of `broker.mqtt_topics`. The hash exchange hashes the routing
/// key, which is the MQTT topic: a device publishing on its own topic stays on one shard queue.
async fn bind_mqtt_topics(channel: &Channel, b: &Broker) -> Result<(), BrokerError> {
    for filter in &b.mqtt_topics {
        let key = settings::mqtt_binding_key(filter)
            .map_err(|e| BrokerError::Topology(format!("broker.mqtt_topics: {e}")))?;
        let (source, destination) = (b.mqtt_exchange.as_str().into(), b.queue.as_str().into());
        match b.topology {
            Topology::Queue => {
                channel
                    .queue_bind(
                        destination,
                        source,
                        key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?
            }
            Topology::Sharded => {
                let options = lapin::options::ExchangeBindOptions::default();
                channel.exchange_bind(destination, source, key.as_str().into(), options, FieldTable::default()).await?
            }
        }
    }
    Ok(())
}

/// What an MQTT publish adds to `SystemProperties` (deliveries from `broker.mqtt_exchange` when
/// `broker.mqtt_topics` is set): `mqtt-topic`, the topic (the routing key's `.` turned back into
/// `/`), and `mqtt-topic-levels`, its levels, so a mapping reads the device id of
/// `devices/{id}/telemetry` as `$.SystemProperties['mqtt-topic-levels'][1]`. RabbitMQ 3.10's
/// plugin turns `/` into `.` and keeps a `.` as it is, so a level with a `.` in it comes back as
/// two levels.
pub fn add_mqtt_topic(envelope: &mut Value, routing_key: &str) {
    let levels: Vec<Value> = routing_key.split('.').map(|l| Value::String(l.to_string())).collect();
    if let Some(system) = envelope.get_mut("SystemProperties").and_then(Value::as_object_mut) {
        system.insert("mqtt-topic".into(), Value::String(routing_key.replace('.', "/")));
        system.insert("mqtt-topic-levels".into(), Value::Array(levels));
    }
}

/// Shard queue `k` of the sharded topology.
pub fn shard_queue(b: &Broker, k: u16) -> String {
    format!("{}.shard-{k}", b.queue)
}

/// The queues this instance consumes: first the ones it is meant to be active on, then those it
/// stands by for (sharded topology: queue `k` belongs to instance `k % instances`).
pub fn consumed_queues(b: &Broker) -> (Vec<String>, Vec<String>) {
    match b.topology {
        Topology::Queue => (vec![b.queue.clone()], Vec::new()),
        Topology::Sharded => {
            let (mine, others): (Vec<u16>, Vec<u16>) =
                (0..b.shard_queues).partition(|k| k % b.instances.max(1) == b.instance);
            let names = |ks: Vec<u16>| ks.into_iter().map(|k| shard_queue(b, k)).collect();
            (names(mine), names(others))
        }
    }
}

/// On a channel of its own: the broker closes the channel that asked for a queue it has with
/// other arguments.
async fn declare_queue(
    conn: &Connection,
    name: &str,
    args: FieldTable,
    kind: QueueType,
) -> lapin::Result<Option<String>> {
    let channel = conn.create_channel().await?;
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    match channel.queue_declare(name.into(), durable, args).await {
        Ok(_) => {
            let _ = channel.close(200, "declared".into()).await;
            Ok(None)
        }
        Err(e) if precondition_failed(&e) => {
            // It exists: make sure, and use it as it is.
            let check = conn.create_channel().await?;
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            check.queue_declare(name.into(), passive, FieldTable::default()).await?;
            let _ = check.close(200, "checked".into()).await;
            let kind = match kind {
                QueueType::Quorum => "quorum",
                QueueType::Classic => "classic",
            };
            Ok(Some(format!(
                "queue '{name}' already exists with other arguments than the connector declares (type from broker.queue_type = \"{kind}\", x-delivery-limit from broker.delivery_limit, the dead-letter exchange); it is used as it is (match the settings to it, or move its messages and delete it to redeclare it). The broker said: {e}"
            )))
        }
        Err(e) => Err(e),
    }
}

fn precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if *p.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED))
}

/// Publishes the original message, untouched, to the dead-letter exchange with its failure, and
/// waits for the broker's confirm.
/// Where a message was consumed from: what dead-lettering records so that `redrive` can send it
/// back the way it came.
struct Origin<'a> {
    queue: &'a str,
    exchange: &'a str,
    routing_key: &'a str,
}

async fn dead_letter(
    channel: &Channel,
    b: &Broker,
    body: &[u8],
    properties: &BasicProperties,
    origin: &Origin<'_>,
    failure: &Failure,
) -> Result<(), String> {
    let mut headers = properties.headers().clone().unwrap_or_default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    headers.insert(ERROR_KIND_HEADER.into(), text(failure.kind.as_str()));
    headers.insert(ERROR_HEADER.into(), text(&failure.message));
    headers.insert("x-iomt-original-queue".into(), text(origin.queue));
    headers.insert("x-iomt-original-exchange".into(), text(origin.exchange));
    headers.insert("x-iomt-original-routing-key".into(), text(origin.routing_key));
    let props = properties.clone().with_headers(headers).with_delivery_mode(2);
    let confirm = channel
        .basic_publish(
            b.dead_letter_exchange.as_str().into(),
            origin.routing_key.into(),
            // Mandatory: with no dead-letter queue bound the broker would confirm and drop it.
            BasicPublishOptions { mandatory: true, ..Default::default() },
            body,
            props,
        )
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    if confirm.is_nack() {
        return Err(format!("the broker refused the message on exchange {}", b.dead_letter_exchange));
    }
    if confirm.take_message().is_some() {
        return Err(format!(
            "no queue is bound to the dead-letter exchange {} (broker.dead_letter_queue {})",
            b.dead_letter_exchange, b.dead_letter_queue
        ));
    }
    Ok(())
}

/// Headers the connector (or the broker) adds when it dead-letters a message; a redriven message
/// goes back without them, as it was first sent.
const DEAD_LETTER_HEADERS: [&str; 10] = [
    ERROR_KIND_HEADER,
    ERROR_HEADER,
    "x-iomt-original-queue",
    "x-iomt-original-exchange",
    "x-iomt-original-routing-key",
    "x-death",
    "x-first-death-reason",
    "x-first-death-queue",
    "x-first-death-exchange",
    "x-delivery-count",
];

/// A message taken from the dead-letter queue; it stays there (unacked) until it is moved back to
/// its queue or the queue is closed.
pub struct DeadLetter {
    /// `x-iomt-error-kind`; `delivery-limit` when the broker dead-lettered it.
    pub kind: String,
    /// `x-iomt-error`, or what the broker's `x-death` says.
    pub error: String,
    pub body: Vec<u8>,
    /// The queue it came from (`x-iomt-original-queue`, else the broker's `x-first-death-queue`).
    pub original_queue: Option<String>,
    /// The exchange it was published to (`x-iomt-original-exchange`, else the broker's
    /// `x-first-death-exchange`); empty for the default exchange.
    original_exchange: String,
    tag: u64,
    properties: BasicProperties,
    routing_key: String,
}

impl DeadLetter {
    /// The evaluation envelope the connector would build for the original message (an MQTT
    /// publish's with its topic, so that `redrive` checks a mapping that reads it).
    pub fn envelope(&self, b: &Broker) -> Result<Value, String> {
        let mut e = envelope(&self.body, &self.properties, &self.original_exchange, &self.routing_key, false)?;
        if is_mqtt(b, &self.original_exchange) {
            add_mqtt_topic(&mut e, &self.routing_key);
        }
        Ok(e)
    }
}

/// Whether a delivery through `exchange` is an MQTT publish the connector was bound to read.
pub fn is_mqtt(b: &Broker, exchange: &str) -> bool {
    !b.mqtt_topics.is_empty() && exchange == b.mqtt_exchange
}

fn header_text(h: &FieldTable, key: &str) -> Option<String> {
    match h.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// The dead-letter queue, read and redriven over one channel with publisher confirms.
pub struct DeadLetterQueue {
    _conn: Connection,
    channel: Channel,
    pub queue: String,
}

impl DeadLetterQueue {
    pub async fn open(b: &Broker) -> Result<DeadLetterQueue, BrokerError> {
        let conn = tls::connect(b, lapin::ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        channel.confirm_select(lapin::options::ConfirmSelectOptions::default()).await?;
        Ok(DeadLetterQueue { _conn: conn, channel, queue: b.dead_letter_queue.clone() })
    }

    /// The next message, held unacked (`None` when none is left that is not already held).
    pub async fn take(&self) -> Result<Option<DeadLetter>, BrokerError> {
        let got = self
            .channel
            .basic_get(self.queue.as_str().into(), lapin::options::BasicGetOptions { no_ack: false })
            .await?;
        let Some(m) = got else { return Ok(None) };
        let d = m.delivery;
        let headers = d.properties.headers().clone().unwrap_or_default();
        let kind = header_text(&headers, ERROR_KIND_HEADER);
        let death = header_text(&headers, "x-first-death-reason");
        let (kind, error) = match (kind, death) {
            (Some(k), _) => (k, header_text(&headers, ERROR_HEADER).unwrap_or_default()),
            (None, Some(reason)) if reason == "delivery_limit" => (
                "delivery-limit".to_string(),
                "the broker dead-lettered it after broker.delivery_limit deliveries: the message kept being \
                 returned unacked (the process stopped or crashed while it was in flight)"
                    .to_string(),
            ),
            (None, Some(reason)) => (format!("broker-{reason}"), format!("the broker dead-lettered it ({reason})")),
            (None, None) => ("unknown".to_string(), "no x-iomt-error-kind header".to_string()),
        };
        let original_queue =
            header_text(&headers, "x-iomt-original-queue").or_else(|| header_text(&headers, "x-first-death-queue"));
        let original_exchange = header_text(&headers, "x-iomt-original-exchange")
            .or_else(|| header_text(&headers, "x-first-death-exchange"))
            .unwrap_or_default();
        let mut clean = FieldTable::default();
        for (k, v) in headers.inner() {
            if !DEAD_LETTER_HEADERS.contains(&k.as_str()) {
                clean.insert(k.clone(), v.clone());
            }
        }
        let routing_key =
            header_text(&headers, "x-iomt-original-routing-key").unwrap_or_else(|| d.routing_key.to_string());
        Ok(Some(DeadLetter {
            kind,
            error,
            body: d.data,
            original_queue,
            original_exchange,
            tag: d.delivery_tag,
            properties: d.properties.with_headers(clean),
            routing_key,
        }))
    }

    /// Publishes the original message back the way it came (through its exchange with its routing
    /// key, so a sharded topology hashes it to the same shard queue; else straight to its queue,
    /// `queue` when it does not say) and, once the broker has confirmed it, removes it from the
    /// dead-letter queue. Unconfirmed, it stays where it was.
    pub async fn move_back(&self, d: &DeadLetter, queue: &str) -> Result<(), String> {
        let (exchange, routing_key) = match d.original_exchange.as_str() {
            "" => ("", d.original_queue.as_deref().unwrap_or(queue)),
            ex => (ex, d.routing_key.as_str()),
        };
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                &d.body,
                d.properties.clone().with_delivery_mode(2),
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        if confirm.is_nack() {
            return Err(format!("the broker refused the message for queue {queue}"));
        }
        if confirm.take_message().is_some() {
            return Err(format!(
                "the message came back unroutable from exchange '{exchange}' with routing key '{routing_key}'"
            ));
        }
        self.channel
            .basic_ack(d.tag, lapin::options::BasicAckOptions::default())
            .await
            .map_err(|e| format!("moved, but not removed from {}: {e}", self.queue))
    }

    /// Returns every message still held to the dead-letter queue.
    pub async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
    }
}

/// A publisher with confirms, keeping many messages in flight (the simulator and `publish`).
pub struct Publisher {
    _conn: lapin::Connection,
    channel: Channel,
    broker: Broker,
    in_flight: std::collections::VecDeque<lapin::PublisherConfirm>,
    max_in_flight: usize,
    pub confirmed: u64,
    pub refused: u64,
}

impl Publisher {
    /// Connects to `broker.url` and declares the queues as `run` does, so that nothing published
    /// before a consumer exists is lost and the connector finds the queue it would have declared.
    pub async fn connect(b: &Broker, max_in_flight: usize) -> Result<Publisher, BrokerError> {
        let conn = tls::connect(b, lapin::ConnectionProperties::default()).await?;
        for w in declare(&conn, b).await? {
            tracing::warn!("{w}");
            eprintln!("warning: {w}");
        }
        let channel = conn.create_channel().await?;
        channel.confirm_select(lapin::options::ConfirmSelectOptions::default()).await?;
        Ok(Publisher {
            _conn: conn,
            channel,
            broker: b.clone(),
            in_flight: Default::default(),
            max_in_flight: max_in_flight.max(1),
            confirmed: 0,
            refused: 0,
        })
    }

    /// Publishes a persistent message stamped with its send time (`x-iomt-sent-at`). In the
    /// sharded topology it goes to the consistent-hash exchange with `device_id` as the routing key
    /// (or in `broker.hash_header`); without a device id that is an error.
    pub async fn send(&mut self, body: &[u8], device_id: Option<&str>) -> Result<(), BrokerError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default();
        let mut h = FieldTable::default();
        h.insert(SENT_AT_HEADER.into(), AMQPValue::LongLongInt(now));
        let b = &self.broker;
        let (exchange, routing_key) = match (b.topology, device_id) {
            (Topology::Queue, _) => (String::new(), b.queue.clone()),
            (Topology::Sharded, Some(d)) if !b.hash_header.is_empty() => {
                h.insert(b.hash_header.as_str().into(), AMQPValue::LongString(LongString::from(d)));
                (b.queue.clone(), String::new())
            }
            (Topology::Sharded, Some(d)) => (b.queue.clone(), d.to_string()),
            (Topology::Sharded, None) => return Err(BrokerError::NoDeviceId),
        };
        let props = BasicProperties::default()
            .with_headers(h)
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let confirm = self
            .channel
            .basic_publish(
                exchange.as_str().into(),
                routing_key.as_str().into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await?;
        self.in_flight.push_back(confirm);
        while self.in_flight.len() >= self.max_in_flight {
            self.settle_one().await?;
        }
        Ok(())
    }

    async fn settle_one(&mut self) -> Result<(), BrokerError> {
        if let Some(c) = self.in_flight.pop_front() {
            if c.await?.is_ack() {
                self.confirmed += 1;
            } else {
                self.refused += 1;
            }
        }
        Ok(())
    }

    /// Waits for every confirm.
    pub async fn flush(&mut self) -> Result<(), BrokerError> {
        while !self.in_flight.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_carries_headers_and_broker_properties() {
        let mut h = FieldTable::default();
        h.insert(
            "iothub-creation-time-utc".into(),
            AMQPValue::LongString(LongString::from("2019-01-30T22:45:02Z".to_string())),
        );
        h.insert(SENT_AT_HEADER.into(), AMQPValue::LongLongInt(1_700_000_000_123));
        let props = BasicProperties::default().with_headers(h).with_message_id("m1".into());
        let e = envelope(br#"{"hr": 1}"#, &props, "ex", "rk", false).unwrap_or_default();
        assert_eq!(e["Body"]["hr"], 1);
        assert_eq!(e["Properties"]["iothub-creation-time-utc"], "2019-01-30T22:45:02Z");
        assert_eq!(e["SystemProperties"]["message-id"], "m1");
        assert_eq!(e["SystemProperties"]["routing-key"], "rk");
        assert_eq!(sent_at(&props), Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)));
        assert!(envelope(b"{not json", &props, "", "", false).is_err());
        let absurd = BasicProperties::default().with_timestamp(u64::MAX);
        assert_eq!(sent_at(&absurd), None);
        assert!(envelope(b"{}", &absurd, "", "", false).is_ok());
        assert_eq!(envelope(b"", &props, "", "", false).map(|e| e["Body"].clone()), Ok(Value::Null));
    }

    #[test]
    fn an_mqtt_publish_gives_the_mapping_its_topic_and_levels() {
        // RabbitMQ 3.10's plugin publishes topic `devices/d1/telemetry` with this routing key.
        let rk = "devices.d1.telemetry";
        let mut e = envelope(br#"{"hr": 1}"#, &BasicProperties::default(), "amq.topic", rk, false).unwrap_or_default();
        add_mqtt_topic(&mut e, rk);
        assert_eq!(e["SystemProperties"]["mqtt-topic"], "devices/d1/telemetry");
        assert_eq!(e["SystemProperties"]["mqtt-topic-levels"], json!(["devices", "d1", "telemetry"]));
        assert_eq!(e["SystemProperties"]["routing-key"], rk);
    }
}
