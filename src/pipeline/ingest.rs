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
    /// Which broker session (connection and channel) deliveries come from; delivery tags restart
    /// with each.
    session: std::sync::atomic::AtomicU64,
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
        Ingest { session: Default::default(), settings, mapping, shards, shared, to_settler }
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
            tag: d.delivery_tag,
            session: self.session.load(Ordering::SeqCst),
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
    ingest.session.fetch_add(1, Ordering::SeqCst);
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

/// Acks settled deliveries, dead-lettering each failed one first. A message that cannot be
/// dead-lettered is returned to the queue, never dropped.
///
/// Acks go out in delivery-tag order, as one `multiple` ack per run of settled tags: RabbitMQ
/// handles in-order acks at the head of its unacked list, while acks in random order (which is
/// how a pipeline of shards and writers finishes) cost it a search each and capped throughput at
/// a fifth of what it can deliver. A tag still in flight holds back the acks after it for at most
/// `STRAGGLER`; then those are acked one by one.
pub async fn settler(
    mut rx: UnboundedReceiver<Settle>,
    dl: Arc<Mutex<Option<Channel>>>,
    broker: Broker,
    shared: Arc<Shared>,
) {
    let mut book = AckBook::default();
    loop {
        let first = tokio::select! {
            s = rx.recv() => s,
            _ = tokio::time::sleep(STRAGGLER), if !book.waiting.is_empty() => {
                book.ack_stragglers(&shared).await;
                continue;
            }
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(s) => batch.push(s),
                Err(_) => break,
            }
        }
        for s in batch {
            let requeue = match &s.failure {
                Some(f) => !dead_letter(&dl, &broker, &shared, &s, f).await,
                None => false,
            };
            book.settled(s, requeue, &shared).await;
        }
        book.ack_in_order(&shared).await;
        book.ack_stragglers(&shared).await;
    }
}

/// How long acks may wait behind a delivery that is still being processed.
const STRAGGLER: Duration = Duration::from_millis(200);

async fn dead_letter(
    dl: &Mutex<Option<Channel>>,
    broker: &Broker,
    shared: &Shared,
    s: &Settle,
    f: &super::delivery::Failure,
) -> bool {
    let channel = dl.lock().ok().and_then(|c| c.clone());
    let published = match channel {
        Some(ch) => rabbitmq::dead_letter(&ch, broker, s, f).await,
        None => Err("no broker connection".into()),
    };
    match published {
        Ok(()) => {
            metrics::get().dead_lettered.with_label_values(&[f.kind]).inc();
            shared.dead_lettered.fetch_add(1, Ordering::SeqCst);
            tracing::info!(kind = f.kind, "message dead-lettered");
            tracing::debug!(kind = f.kind, error = %f.message, "dead-letter reason");
            true
        }
        Err(e) => {
            tracing::error!(kind = f.kind, error = %e, "could not dead-letter a message; returning it to the queue");
            false
        }
    }
}

#[derive(Default)]
struct AckBook {
    session: u64,
    /// The lowest delivery tag not yet acked in this session.
    next: u64,
    /// Settled deliveries waiting for the tags before them, by tag.
    waiting: std::collections::BTreeMap<u64, Settle>,
    /// Tags acked ahead of `next` (stragglers' followers), skipped when `next` reaches them.
    acked_ahead: std::collections::BTreeSet<u64>,
    since: Option<Instant>,
}

impl AckBook {
    async fn settled(&mut self, s: Settle, requeue: bool, shared: &Shared) {
        if s.session != self.session {
            if s.session < self.session {
                // From a closed session: its tags are void; the broker redelivers the message.
                count(&s, false, shared);
                return;
            }
            // A new session: what waited for the old one cannot be acked any more.
            for (_, old) in std::mem::take(&mut self.waiting) {
                count(&old, false, shared);
            }
            self.acked_ahead.clear();
            self.session = s.session;
            self.next = 1;
        }
        if requeue {
            // Returned to the queue at once, on its own; its tag counts as done.
            let done = match &s.acker {
                Some(a) => a.nack(BasicNackOptions { requeue: true, ..Default::default() }).await.unwrap_or(false),
                None => true,
            };
            let _ = done;
            self.acked_ahead.insert(s.tag);
            count(&s, false, shared);
            return;
        }
        self.since.get_or_insert_with(Instant::now);
        self.waiting.insert(s.tag, s);
    }

    /// One `multiple` ack for the run of settled tags starting at `next`.
    async fn ack_in_order(&mut self, shared: &Shared) {
        let mut run = Vec::new();
        loop {
            if self.acked_ahead.remove(&self.next) {
                self.next += 1;
            } else if let Some(s) = self.waiting.remove(&self.next) {
                run.push(s);
                self.next += 1;
            } else {
                break;
            }
        }
        if let Some(last) = run.last() {
            let ok = match &last.acker {
                Some(a) => a.ack(BasicAckOptions { multiple: true }).await.unwrap_or(false),
                None => true,
            };
            if !ok {
                tracing::debug!("ack not sent (channel closed); the broker will redeliver");
            }
            for s in &run {
                count(s, ok, shared);
            }
        }
        if self.waiting.is_empty() {
            self.since = None;
        }
    }

    /// Acks, one by one, what has waited `STRAGGLER` behind a tag still in flight.
    async fn ack_stragglers(&mut self, shared: &Shared) {
        if self.since.is_none_or(|t| t.elapsed() < STRAGGLER) {
            return;
        }
        for (tag, s) in std::mem::take(&mut self.waiting) {
            let ok = match &s.acker {
                Some(a) => a.ack(BasicAckOptions::default()).await.unwrap_or(false),
                None => true,
            };
            self.acked_ahead.insert(tag);
            count(&s, ok, shared);
        }
        self.since = None;
    }
}

/// Books a settled delivery: acked (or not, when its channel is gone), latency, in-flight count.
fn count(s: &Settle, acked: bool, shared: &Shared) {
    let m = metrics::get();
    if acked {
        m.messages_acked.inc();
    }
    m.unacked.dec();
    let since =
        s.sent_at.and_then(|t| SystemTime::now().duration_since(t).ok()).unwrap_or_else(|| s.received.elapsed());
    m.latency.observe(since.as_secs_f64());
    shared.settled.fetch_add(1, Ordering::SeqCst);
}
