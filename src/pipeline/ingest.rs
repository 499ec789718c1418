//! Ingest: one consumer on the queue (manual acks, prefetch), reconnecting when the broker goes
//! away; each delivery is normalized and its measurements routed to the shard of their device.
//! The settler acks or dead-letters deliveries once their guards are dropped.

use super::delivery::{DeliveryGuard, Settle};
use super::shard::{DeviceShard, Ingest as ShardIngest};
use super::{Counted, Shared, shard_for};
use crate::config::{Broker, Settings, Unmatched};
use crate::metrics;
use crate::model::measurement::Measurement;
use crate::source::rabbitmq;
use crate::template::device::DeviceMapping;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::watch;

pub struct Ingest {
    settings: Arc<Settings>,
    mapping: Arc<DeviceMapping>,
    shards: Arc<Vec<Counted<DeviceShard>>>,
    shared: Arc<Shared>,
    to_settler: UnboundedSender<Settle>,
}

/// What keeps the broker session open while the last acks go out.
pub type KeepAlive = (Connection, Channel);

impl Ingest {
    pub fn new(
        settings: Arc<Settings>,
        mapping: Arc<DeviceMapping>,
        shards: Arc<Vec<Counted<DeviceShard>>>,
        shared: Arc<Shared>,
        to_settler: UnboundedSender<Settle>,
    ) -> Self {
        Ingest { settings, mapping, shards, shared, to_settler }
    }

    fn handle(&self, d: Delivery) {
        let m = metrics::get();
        m.messages_received.inc();
        m.unacked.inc();
        self.shared.received.fetch_add(1, Ordering::SeqCst);
        let event =
            rabbitmq::envelope(&d.data, &d.properties, d.exchange.as_str(), d.routing_key.as_str(), d.redelivered);
        let sent_at = rabbitmq::sent_at(&d.properties);
        let settle = Settle {
            acker: Some(d.acker),
            body: d.data,
            properties: d.properties,
            routing_key: d.routing_key.as_str().to_string(),
            failure: None,
            sent_at,
            received: Instant::now(),
        };
        let guard = Arc::new(DeliveryGuard::new(settle, self.to_settler.clone()));
        let event = match event {
            Ok(e) => e,
            Err(why) => return guard.fail("invalid-json", why),
        };
        let measurements = match self.mapping.normalize(&event) {
            Ok(ms) => ms,
            Err(e) => return guard.fail(e.kind(), e.to_string()),
        };
        if measurements.is_empty() {
            match self.settings.broker.unmatched {
                Unmatched::Drop => m.messages_dropped.with_label_values(&["no-match"]).inc(),
                Unmatched::DeadLetter => {
                    guard.fail("no-template-matched", "no device template's typeMatchExpression matched the message")
                }
            }
            return;
        }
        m.measurements.inc_by(measurements.len() as u64);
        self.route(measurements, &guard);
    }

    fn route(&self, mut measurements: Vec<Measurement>, guard: &Arc<DeliveryGuard>) {
        let now = chrono::Utc::now();
        for ms in &mut measurements {
            ms.ingestion_time = Some(now);
        }
        let n = self.shards.len();
        if n == 1 {
            self.shards[0].do_send(ShardIngest { measurements, guard: guard.clone() });
            return;
        }
        let mut per_shard: Vec<Vec<Measurement>> = (0..n).map(|_| Vec::new()).collect();
        for ms in measurements {
            per_shard[shard_for(&ms.device_id, n)].push(ms);
        }
        for (shard, ms) in self.shards.iter().zip(per_shard) {
            if !ms.is_empty() {
                shard.do_send(ShardIngest { measurements: ms, guard: guard.clone() });
            }
        }
    }
}

enum Ended {
    Stopped(Box<KeepAlive>),
    Lost(String),
}

/// Consumes until told to stop, reconnecting after `reconnect_delay_secs` whenever the broker
/// connection fails. Returns the session so its channel stays open for the final acks.
pub async fn run(
    ingest: Ingest,
    mut stop: watch::Receiver<bool>,
    dl: Arc<Mutex<Option<Channel>>>,
) -> Option<KeepAlive> {
    let delay = Duration::from_secs(ingest.settings.broker.reconnect_delay_secs.max(1));
    loop {
        if *stop.borrow() {
            return None;
        }
        match session(&ingest, &mut stop, &dl).await {
            Ended::Stopped(keep) => return Some(*keep),
            Ended::Lost(why) => {
                ingest.shared.broker_connected.store(false, Ordering::SeqCst);
                tracing::warn!(error = %why, retry_in_s = delay.as_secs(), "broker connection lost; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return None,
                }
            }
        }
    }
}

async fn session(ingest: &Ingest, stop: &mut watch::Receiver<bool>, dl: &Arc<Mutex<Option<Channel>>>) -> Ended {
    let b = &ingest.settings.broker;
    let setup = async {
        // Named, so an operator (or a test) can find this instance's connection in RabbitMQ.
        let name = format!("iomt-connector {} pid {}", b.queue, std::process::id());
        let props = ConnectionProperties::default().with_connection_name(name.into());
        let conn = Connection::connect(&b.url, props).await?;
        let channel = conn.create_channel().await?;
        let dl_channel = conn.create_channel().await?;
        dl_channel.confirm_select(ConfirmSelectOptions::default()).await?;
        if b.declare {
            rabbitmq::declare(&channel, b).await?;
        }
        channel.basic_qos(b.prefetch, BasicQosOptions::default()).await?;
        let tag = format!("iomt-connector-{}", std::process::id());
        let consumer = channel
            .basic_consume(
                b.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok::<_, lapin::Error>((conn, channel, dl_channel, consumer, tag))
    };
    let (conn, channel, dl_channel, mut consumer, tag) = match setup.await {
        Ok(s) => s,
        Err(e) => return Ended::Lost(format!("{} ({})", e, redact(&b.url))),
    };
    if let Ok(mut slot) = dl.lock() {
        *slot = Some(dl_channel);
    }
    ingest.shared.broker_connected.store(true, Ordering::SeqCst);
    tracing::info!(queue = %b.queue, prefetch = b.prefetch, "consuming");
    let sampler = backlog_sampler(&conn, b.queue.clone()).await;
    let ended = loop {
        tokio::select! {
            next = consumer.next() => match next {
                Some(Ok(d)) => ingest.handle(d),
                Some(Err(e)) => break Ended::Lost(e.to_string()),
                None => break Ended::Lost("the broker cancelled the consumer".into()),
            },
            _ = stop.changed() => {
                let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                // Deliveries already on their way are processed, not left unacked.
                while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await {
                    ingest.handle(d);
                }
                break Ended::Stopped(Box::new((conn, channel)));
            }
        }
    };
    if let Some(s) = sampler {
        s.abort();
    }
    ended
}

/// Samples the queue's ready-message count for the backlog gauge.
async fn backlog_sampler(conn: &Connection, queue: String) -> Option<tokio::task::JoinHandle<()>> {
    let ch = conn.create_channel().await.ok()?;
    Some(actix_rt::spawn(async move {
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        loop {
            if let Ok(q) = ch.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await {
                metrics::get().backlog.set(q.message_count() as i64);
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }))
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    }
}

/// Acks each settled delivery, dead-lettering it first when it carries a failure. A message that
/// cannot be dead-lettered is returned to the queue, never dropped.
pub async fn settler(
    mut rx: UnboundedReceiver<Settle>,
    dl: Arc<Mutex<Option<Channel>>>,
    broker: Broker,
    shared: Arc<Shared>,
) {
    while let Some(s) = rx.recv().await {
        let m = metrics::get();
        let mut requeue = false;
        if let Some(f) = &s.failure {
            let channel = dl.lock().ok().and_then(|c| c.clone());
            let published = match channel {
                Some(ch) => rabbitmq::dead_letter(&ch, &broker, &s, f).await,
                None => Err("no broker connection".into()),
            };
            match published {
                Ok(()) => {
                    m.dead_lettered.with_label_values(&[f.kind]).inc();
                    shared.dead_lettered.fetch_add(1, Ordering::SeqCst);
                    tracing::info!(kind = f.kind, "message dead-lettered");
                    tracing::debug!(kind = f.kind, error = %f.message, "dead-letter reason");
                }
                Err(e) => {
                    tracing::error!(kind = f.kind, error = %e, "could not dead-letter a message; returning it to the queue");
                    requeue = true;
                }
            }
        }
        if let Some(acker) = &s.acker {
            let done = if requeue {
                acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await
            } else {
                acker.ack(BasicAckOptions::default()).await
            };
            match done {
                Ok(true) if !requeue => m.messages_acked.inc(),
                Ok(_) if requeue => {}
                // The channel is gone: the broker redelivers the message, and the deterministic
                // ids plus the merge make the redelivery converge.
                Ok(_) => tracing::debug!("ack not sent (channel closed); the broker will redeliver"),
                Err(e) => tracing::debug!(error = %e, "ack failed; the broker will redeliver"),
            }
        }
        m.unacked.dec();
        let since =
            s.sent_at.and_then(|t| SystemTime::now().duration_since(t).ok()).unwrap_or_else(|| s.received.elapsed());
        m.latency.observe(since.as_secs_f64());
        shared.settled.fetch_add(1, Ordering::SeqCst);
    }
}
