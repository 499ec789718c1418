//! RabbitMQ (AMQP 0-9-1, `lapin`): the evaluation envelope of a delivery, the queue topology, and
//! dead-lettering.

use crate::config::Broker;
use crate::pipeline::delivery::{Failure, Settle};
use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};
use serde_json::{Map, Value, json};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    let body: Value = if body.iter().all(u8::is_ascii_whitespace) {
        // An empty body is no error in the reference: it matches nothing.
        Value::Null
    } else {
        serde_json::from_slice(body).map_err(|e| format!("the message body is not valid JSON: {e}"))?
    };
    let properties = props.headers().as_ref().map(table_json).unwrap_or_else(|| Value::Object(Map::new()));
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
    Ok(json!({"Body": body, "Properties": properties, "SystemProperties": Value::Object(system)}))
}

fn table_json(t: &FieldTable) -> Value {
    Value::Object(t.inner().iter().map(|(k, v)| (k.as_str().to_string(), amqp_json(v))).collect())
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
        AMQPValue::FieldTable(t) => table_json(t),
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

/// The queue, and a durable fanout dead-letter exchange bound to the dead-letter queue.
pub async fn declare(channel: &Channel, b: &Broker) -> lapin::Result<()> {
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare(b.queue.as_str().into(), durable, FieldTable::default()).await?;
    let ex = ExchangeDeclareOptions { durable: true, ..Default::default() };
    channel
        .exchange_declare(b.dead_letter_exchange.as_str().into(), ExchangeKind::Fanout, ex, FieldTable::default())
        .await?;
    channel.queue_declare(b.dead_letter_queue.as_str().into(), durable, FieldTable::default()).await?;
    channel
        .queue_bind(
            b.dead_letter_queue.as_str().into(),
            b.dead_letter_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Publishes the original message, untouched, to the dead-letter exchange with its failure, and
/// waits for the broker's confirm.
pub async fn dead_letter(channel: &Channel, b: &Broker, s: &Settle, failure: &Failure) -> Result<(), String> {
    let mut headers = s.properties.headers().clone().unwrap_or_default();
    headers.insert(ERROR_KIND_HEADER.into(), AMQPValue::LongString(LongString::from(failure.kind.to_string())));
    headers.insert(ERROR_HEADER.into(), AMQPValue::LongString(LongString::from(failure.message.clone())));
    headers.insert("x-iomt-original-queue".into(), AMQPValue::LongString(LongString::from(b.queue.clone())));
    headers
        .insert("x-iomt-original-routing-key".into(), AMQPValue::LongString(LongString::from(s.routing_key.clone())));
    let props = s.properties.clone().with_headers(headers).with_delivery_mode(2);
    let confirm = channel
        .basic_publish(
            b.dead_letter_exchange.as_str().into(),
            s.routing_key.as_str().into(),
            BasicPublishOptions::default(),
            &s.body,
            props,
        )
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    if confirm.is_nack() {
        return Err(format!("the broker refused the message on exchange {}", b.dead_letter_exchange));
    }
    Ok(())
}

/// A publisher with confirms, keeping many messages in flight (the simulator and `publish`).
pub struct Publisher {
    _conn: lapin::Connection,
    channel: Channel,
    queue: String,
    in_flight: std::collections::VecDeque<lapin::PublisherConfirm>,
    max_in_flight: usize,
    pub confirmed: u64,
    pub refused: u64,
}

impl Publisher {
    /// Connects and declares `queue` (durable) so that nothing published before a consumer exists
    /// is lost.
    pub async fn connect(url: &str, queue: &str, max_in_flight: usize) -> lapin::Result<Publisher> {
        let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        channel.confirm_select(lapin::options::ConfirmSelectOptions::default()).await?;
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(queue.into(), durable, FieldTable::default()).await?;
        Ok(Publisher {
            _conn: conn,
            channel,
            queue: queue.to_string(),
            in_flight: Default::default(),
            max_in_flight: max_in_flight.max(1),
            confirmed: 0,
            refused: 0,
        })
    }

    /// Publishes a persistent message stamped with its send time (`x-iomt-sent-at`).
    pub async fn send(&mut self, body: &[u8]) -> lapin::Result<()> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default();
        let mut h = FieldTable::default();
        h.insert(SENT_AT_HEADER.into(), AMQPValue::LongLongInt(now));
        let props = BasicProperties::default()
            .with_headers(h)
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let confirm = self
            .channel
            .basic_publish("".into(), self.queue.as_str().into(), BasicPublishOptions::default(), body, props)
            .await?;
        self.in_flight.push_back(confirm);
        while self.in_flight.len() >= self.max_in_flight {
            self.settle_one().await?;
        }
        Ok(())
    }

    async fn settle_one(&mut self) -> lapin::Result<()> {
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
    pub async fn flush(&mut self) -> lapin::Result<()> {
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
}
