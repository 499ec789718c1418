//! The RabbitMQ source: one consumer on the queue (manual acks, prefetch), reconnecting when the
//! broker goes away, handing each delivery to the pipeline's intake; and the settler, which acks or
//! dead-letters each delivery once the pipeline has settled it.

use super::settings::Broker;
use super::tls::{self, TlsError};
use super::{BrokerError, Origin, consumed_queues, dead_letter, declare, envelope, sent_at};
use crate::metrics;
use crate::model::kind::ErrorKind;
use crate::problems::redact;
use crate::source::budget::Lease;
use crate::source::ordered::InOrder;
use crate::source::{
    DeliveryGuard, Failure, Intake, Position, Settled, Status, book_dead_lettered, book_received, book_settled,
};
use crate::status::{QueueState, Shared};
use futures_util::StreamExt;
use futures_util::stream::{self, BoxStream, SelectAll};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Acker, BasicProperties, Channel, Connection, ConnectionProperties};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::watch;
use tokio_util::task::task_tracker::TaskTrackerToken;

/// What the source keeps of a delivery until it is settled (the pipeline sees it as a `Position`).
struct Record {
    acker: Acker,
    /// The delivery tag and the broker session (channel) it belongs to: acks go out in tag order.
    tag: u64,
    session: u64,
    body: Vec<u8>,
    properties: BasicProperties,
    queue: Arc<str>,
    exchange: String,
    routing_key: String,
    /// The body's bytes, counted in flight until the delivery is acked or dead-lettered.
    _lease: Lease,
}

/// A settled delivery waiting for its ack.
struct Done {
    record: Record,
    sent_at: Option<SystemTime>,
    received: Instant,
    /// Held until the ack is out: the service's shutdown waits for it.
    _work: Option<TaskTrackerToken>,
}

/// What keeps the broker session open while the last acks go out.
type KeepAlive = (Connection, Channel);

/// The queues this instance consumes, as `/actors` shows them.
struct Queues(Vec<Arc<QueueState>>);

impl crate::status::SourceView for Queues {
    fn kind(&self) -> &'static str {
        "rabbitmq"
    }

    fn snapshot(&self) -> serde_json::Value {
        let queues = crate::status::sorted_by(self.0.iter().map(|q| q.snapshot()).collect(), "name");
        serde_json::json!({"kind": "rabbitmq", "queues": queues})
    }
}

/// The running RabbitMQ source.
pub struct Running {
    stop: watch::Sender<bool>,
    consumer: Option<tokio::task::JoinHandle<Option<KeepAlive>>>,
    keep_alive: Option<KeepAlive>,
    settler: tokio::task::JoinHandle<()>,
}

/// Starts consuming `broker.queue` into `intake`.
pub fn start(broker: Broker, intake: Arc<dyn Intake>, shared: Arc<Shared>) -> Running {
    let (primary, standby) = consumed_queues(&broker);
    let states =
        |names: Vec<String>, role| -> Vec<Arc<QueueState>> { names.iter().map(|q| QueueState::new(q, role)).collect() };
    let (primary, standby) = (states(primary, "primary"), states(standby, "standby"));
    let queues = Arc::new(Queues(primary.iter().chain(&standby).cloned().collect()));
    let _ = shared.source.set(queues.clone());
    if !broker.management_url.is_empty() {
        actix_rt::spawn(watch_activity(broker.clone(), queues));
    }
    let (stop, stop_rx) = watch::channel(false);
    let (to_settler, settled) = tokio::sync::mpsc::unbounded_channel();
    let (reads, read) = tokio::sync::mpsc::unbounded_channel();
    let dl_channel = Arc::new(Mutex::new(None));
    let settler = actix_rt::spawn(settler(settled, read, dl_channel.clone(), broker.clone()));
    let session = AtomicU64::new(0);
    let consumer = Consumer { session, broker, intake, shared, to_settler, reads, primary, standby };
    let consumer = actix_rt::spawn(run(consumer, stop_rx, dl_channel));
    Running { stop, consumer: Some(consumer), keep_alive: None, settler }
}

#[async_trait::async_trait(?Send)]
impl crate::source::Running for Running {
    /// Stops taking deliveries; those already sent by the broker are still handed over.
    async fn stop_taking(&mut self) {
        let _ = self.stop.send(true);
        if let Some(c) = self.consumer.take() {
            self.keep_alive = c.await.ok().flatten();
        }
    }

    /// Closes the broker session (once the pipeline has settled what it was given).
    async fn close(self: Box<Self>) {
        drop(self.keep_alive);
        self.settler.abort();
    }
}

struct Consumer {
    /// Which broker session (connection and channel) deliveries come from; delivery tags restart
    /// with each.
    session: AtomicU64,
    broker: Broker,
    intake: Arc<dyn Intake>,
    shared: Arc<Shared>,
    to_settler: UnboundedSender<Settled>,
    /// Each delivery's (session, tag), sent before the pipeline sees it: the settler's order.
    reads: UnboundedSender<(u64, u64)>,
    /// The queues consumed at once, and those stood by for.
    primary: Vec<Arc<QueueState>>,
    standby: Vec<Arc<QueueState>>,
}

/// This process's consumer tag on `queue`: unique across instances and hosts, so the broker's
/// management API can tell which consumer is ours.
fn consumer_tag(queue: &str) -> String {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let token = TOKEN.get_or_init(|| format!("{}-{:08x}", std::process::id(), fastrand::u32(..)));
    format!("iomt-connector-{token}-{queue}")
}

/// How long an instance waits before it stands by on the other instances' shard queues, so that
/// instances started together each become the active consumer of their own queues first.
const STANDBY_DELAY: Duration = Duration::from_secs(3);
/// How long one connection attempt (connect, declare, subscribe) may take before it is retried.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// A delivery with the queue it came from; `None` when the broker ended that consumer.
type Tagged = (Arc<QueueState>, Option<Result<Delivery, lapin::Error>>);

/// The consumer tag of this process's `generation`th consumer on `queue`: a window opened again
/// never reuses the tag of the consumer it cancelled, whose cancel-ok may still be on its way.
fn generation_tag(queue: &str, generation: u32) -> String {
    format!("{}-{generation}", consumer_tag(queue))
}

async fn subscribe(
    channel: &Channel,
    queue: &Arc<QueueState>,
    generation: u32,
) -> lapin::Result<BoxStream<'static, Tagged>> {
    let c = channel
        .basic_consume(
            (&*queue.name).into(),
            generation_tag(&queue.name, generation).as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (q, end) = (queue.clone(), queue.clone());
    Ok(c.map(move |d| (q.clone(), Some(d))).chain(stream::once(async move { (end, None) })).boxed())
}

/// A delivery taken in: booked, its bytes leased, its tag in the settler's order and its guard
/// made, but not yet handed to the pipeline (a taken-over queue's deliveries wait out the grace).
/// Never dropped unhanded: the guard would report it persisted.
struct Received {
    guard: DeliveryGuard,
    /// `Err`: larger than `pipeline.max_message_bytes`, with why.
    event: Result<Result<serde_json::Value, String>, String>,
}

impl Consumer {
    fn receive(&self, queue: &QueueState, d: Delivery) -> Received {
        book_received();
        queue.delivered();
        let budget = self.intake.budget();
        let (lease, too_large) = budget.take(d.data.len());
        let event = match too_large {
            Some(why) => Err(why),
            None => Ok(envelope(&d.data, &d.properties, d.exchange.as_str(), d.routing_key.as_str(), d.redelivered)
                .map(|mut e| {
                    if super::is_mqtt(&self.broker, d.exchange.as_str()) {
                        super::add_mqtt_topic(&mut e, d.routing_key.as_str());
                    }
                    e
                })),
        };
        let record = Record {
            acker: d.acker,
            tag: d.delivery_tag,
            session: self.session.load(Ordering::SeqCst),
            body: d.data,
            queue: queue.name.clone(),
            exchange: d.exchange.as_str().to_string(),
            routing_key: d.routing_key.as_str().to_string(),
            properties: d.properties,
            _lease: lease,
        };
        let sent_at = sent_at(&record.properties);
        let _ = self.reads.send((record.session, record.tag));
        Received { guard: DeliveryGuard::new(Position::new(record), sent_at, self.to_settler.clone()), event }
    }

    fn hand_over(&self, r: Received) {
        match r.event {
            Ok(event) => self.intake.accept(event, Arc::new(r.guard)),
            // Never parsed: dead-lettered as it came, once the guard drops here.
            Err(why) => r.guard.fail(ErrorKind::MessageTooLarge, why),
        }
    }
}

/// Why a session could not start.
enum Setup {
    Amqp(lapin::Error),
    /// The queues exist in a shape the topology cannot work with.
    Topology(String),
    Tls(TlsError),
}

impl From<lapin::Error> for Setup {
    fn from(e: lapin::Error) -> Self {
        Setup::Amqp(e)
    }
}

enum Ended {
    Stopped(Box<KeepAlive>),
    Lost(String),
}

/// Consumes until told to stop, reconnecting after `reconnect_delay_secs` whenever the broker
/// connection fails. Returns the session so its channel stays open for the final acks.
async fn run(
    consumer: Consumer,
    mut stop: watch::Receiver<bool>,
    dl: Arc<Mutex<Option<Channel>>>,
) -> Option<KeepAlive> {
    let delay = Duration::from_secs(consumer.broker.reconnect_delay_secs.max(1));
    loop {
        if *stop.borrow() {
            return None;
        }
        match session(&consumer, &mut stop, &dl).await {
            Ended::Stopped(keep) => return Some(*keep),
            Ended::Lost(why) => {
                consumer.shared.broker_connected.store(false, Ordering::SeqCst);
                tracing::warn!(error = %why, retry_in_s = delay.as_secs(), "broker connection lost; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return None,
                }
            }
        }
    }
}

/// A session's connection, its consuming channel, its confirming dead-letter channel, and the
/// deliveries of the queues it consumes at once.
type Opened = (Connection, Channel, Channel, SelectAll<BoxStream<'static, Tagged>>);

/// Connects, declares and subscribes to the primary queues, within `SETUP_TIMEOUT`.
async fn open(consumer: &Consumer) -> Result<Opened, String> {
    let b = &consumer.broker;
    let setup = async {
        // Named, so an operator (or a test) can find this instance's connection in RabbitMQ.
        let name = format!("iomt-connector {} pid {}", b.queue, std::process::id());
        let props = ConnectionProperties::default().with_connection_name(name.into());
        let conn = tls::connect(b, props).await.map_err(|e| match e {
            BrokerError::Amqp(e) => Setup::Amqp(e),
            BrokerError::Tls(e) => Setup::Tls(e),
            e => Setup::Topology(e.to_string()),
        })?;
        let channel = conn.create_channel().await?;
        let dl_channel = conn.create_channel().await?;
        dl_channel.confirm_select(ConfirmSelectOptions::default()).await?;
        if b.declare {
            match declare(&conn, b).await {
                Ok(warnings) => warnings.iter().for_each(|w| tracing::warn!("{w}")),
                Err(BrokerError::Amqp(e)) => return Err(Setup::Amqp(e)),
                Err(e) => return Err(Setup::Topology(e.to_string())),
            }
        }
        // Per consumer: each queue this instance is active on gets the whole window.
        channel.basic_qos(first_window(consumer), BasicQosOptions::default()).await?;
        let mut deliveries = SelectAll::new();
        for q in &consumer.primary {
            deliveries.push(subscribe(&channel, q, 0).await?);
        }
        Ok::<_, Setup>((conn, channel, dl_channel, deliveries))
    };
    // A broker that accepts the TCP connection but never finishes the handshake or a declare (an
    // overloaded node, a quorum queue without a leader) must not stall the connector unready forever:
    // give up on this attempt and reconnect, saying so.
    match tokio::time::timeout(SETUP_TIMEOUT, setup).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(Setup::Amqp(e))) => Err(format!("{} ({})", e, redact(&b.url))),
        Ok(Err(Setup::Topology(why))) => Err(why),
        Ok(Err(Setup::Tls(e))) => Err(e.to_string()),
        Err(_) => Err(format!(
            "the broker at {} did not complete connecting, declaring and subscribing within {} s",
            redact(&b.url),
            SETUP_TIMEOUT.as_secs()
        )),
    }
}

async fn session(consumer: &Consumer, stop: &mut watch::Receiver<bool>, dl: &Arc<Mutex<Option<Channel>>>) -> Ended {
    let (conn, channel, dl_channel, deliveries) = match open(consumer).await {
        Ok(s) => s,
        Err(why) => return Ended::Lost(why),
    };
    if let Ok(mut slot) = dl.lock() {
        *slot = Some(dl_channel);
    }
    consumer.session.fetch_add(1, Ordering::SeqCst);
    consumer.shared.broker_connected.store(true, Ordering::SeqCst);
    let (primary, standby) = (&consumer.primary, &consumer.standby);
    let names: Vec<String> = primary.iter().chain(standby).map(|q| q.name.to_string()).collect();
    let prefetch = consumer.broker.prefetch;
    tracing::info!(queues = ?&names[..primary.len()], standby = standby.len(), prefetch, "consuming");
    let sampler = backlog_sampler(&conn, names).await;
    let ended = match consume(consumer, &channel, deliveries, stop).await {
        Ok(()) => Ended::Stopped(Box::new((conn, channel))),
        Err(why) => Ended::Lost(why),
    };
    if let Some(s) = sampler {
        s.abort();
    }
    ended
}

#[path = "window.rs"]
mod window;
use window::{Window, first_window, fixed};

#[path = "takeover.rs"]
mod takeover;
use takeover::{Grace, standby_schedule};

/// Hands deliveries over until told to stop (`Ok`) or the session fails (`Err`, why); what waits
/// out a takeover grace then is handed over too, never dropped.
async fn consume(
    consumer: &Consumer,
    channel: &Channel,
    deliveries: SelectAll<BoxStream<'static, Tagged>>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let mut grace = Grace::new(&consumer.broker);
    let ended = pump(consumer, channel, deliveries, stop, &mut grace).await;
    grace.release_all(consumer);
    ended
}

async fn pump(
    consumer: &Consumer,
    channel: &Channel,
    mut deliveries: SelectAll<BoxStream<'static, Tagged>>,
    stop: &mut watch::Receiver<bool>,
    grace: &mut Grace,
) -> Result<(), String> {
    let (b, primary, standby) = (&consumer.broker, &consumer.primary, &consumer.standby);
    let budget = consumer.intake.budget().clone();
    let started = tokio::time::Instant::now();
    let schedule = standby_schedule(b, standby, STANDBY_DELAY);
    let mut stood_by = 0;
    let mut window = Window {
        fixed: fixed(consumer),
        queues: primary.clone(),
        prefetch: first_window(consumer),
        paused: false,
        reopen: None,
        generation: 0,
        cancelled: Default::default(),
    };
    loop {
        let standby_due = schedule.get(stood_by).map(|(after, _)| started + *after);
        let grace_ends = grace.next_end();
        tokio::select! {
            // An instance with no queue of its own yet (a pure standby) waits for its standby turn.
            next = deliveries.next(), if !deliveries.is_empty() && window.taking() => match next {
                Some((q, Some(Ok(d)))) => {
                    let redelivered = d.redelivered;
                    let r = consumer.receive(&q, d);
                    if let Some(r) = grace.admit(&q, redelivered, r) {
                        consumer.hand_over(r);
                    }
                    window.adjust(channel, &budget, b.prefetch).await?;
                }
                Some((_, Some(Err(e)))) => return Err(e.to_string()),
                Some((q, None)) if window.expected_end(&q.name) => window.resume_resize(channel, &mut deliveries).await?,
                Some((q, None)) => return Err(format!("the broker cancelled the consumer of queue {}", q.name)),
                None if window.paused || window.reopen.is_some() => {}
                None => return Err("no consumer left".into()),
            },
            _ = tokio::time::sleep_until(grace_ends.unwrap_or(started)), if grace_ends.is_some() => {
                grace.release_ended(consumer);
            }
            _ = budget.room(), if window.paused && window.quiet() => {
                window.resume(channel, &budget, b.prefetch, &mut deliveries).await?;
            }
            _ = tokio::time::sleep_until(standby_due.unwrap_or(started)), if standby_due.is_some() && window.consuming() => {
                let q = &schedule[stood_by].1;
                stood_by += 1;
                match subscribe(channel, q, window.generation).await {
                    Ok(s) => {
                        deliveries.push(s);
                        window.queues.push(q.clone());
                    }
                    Err(e) => tracing::warn!(queue = %q.name, error = %e, "cannot stand by on a shard queue"),
                }
            }
            _ = stop.changed() => {
                if window.consuming() {
                    let _ = window.cancel(channel).await;
                }
                // Deliveries already on their way are processed, not left unacked.
                // Behind what waits out a grace on the same queue: `consume` hands that over next.
                while let Ok(Some((q, Some(Ok(d))))) = tokio::time::timeout(Duration::from_millis(500), deliveries.next()).await {
                    let redelivered = d.redelivered;
                    let r = consumer.receive(&q, d);
                    if let Some(r) = grace.admit(&q, redelivered, r) {
                        consumer.hand_over(r);
                    }
                }
                return Ok(());
            }
        }
    }
}

/// Samples the queues' ready-message counts for the backlog gauge.
async fn backlog_sampler(conn: &Connection, queues: Vec<String>) -> Option<tokio::task::JoinHandle<()>> {
    let ch = conn.create_channel().await.ok()?;
    Some(actix_rt::spawn(async move {
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        loop {
            let mut ready = 0i64;
            for queue in &queues {
                if let Ok(q) = ch.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await {
                    ready += q.message_count() as i64;
                }
            }
            metrics::get().backlog.set(ready);
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }))
}

/// Asks RabbitMQ's management API, every 2 s, which of this process's consumers are active (a
/// single-active-consumer queue has one active consumer; the others wait), for `/actors` and
/// `iomt_queue_active`.
async fn watch_activity(b: Broker, queues: Arc<Queues>) {
    let Ok(amqp) = reqwest::Url::parse(&b.url) else { return };
    let vhost = match amqp.path().trim_start_matches('/') {
        "" => "%2F".to_string(),
        v => v.to_string(),
    };
    let url = format!("{}/api/consumers/{vhost}", b.management_url.trim_end_matches('/'));
    let user = if amqp.username().is_empty() { "guest".to_string() } else { amqp.username().to_string() };
    let password = amqp.password().map(str::to_string);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap_or_default();
    let mut warned = false;
    loop {
        let answer = http.get(&url).basic_auth(&user, password.as_deref()).send().await;
        let consumers = match answer {
            Ok(r) if r.status().is_success() => r.json::<Vec<serde_json::Value>>().await.ok(),
            Ok(r) => {
                if !warned {
                    tracing::warn!(status = %r.status(), "broker.management_url answered with an error; queue activity unknown");
                }
                None
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "broker.management_url does not answer; queue activity unknown");
                }
                None
            }
        };
        warned = consumers.is_none();
        for q in &queues.0 {
            let active = consumers.as_ref().map(|list| {
                // Any generation of this process's consumer on the queue.
                let tag = format!("{}-", consumer_tag(&q.name));
                list.iter().any(|c| {
                    c["consumer_tag"].as_str().is_some_and(|t| t.starts_with(&tag))
                        && c["queue"]["name"] == *q.name
                        && c["active"] == true
                })
            });
            q.set_active(active);
            let gauge = metrics::get().queue_active.with_label_values(&[&*q.name]);
            match active {
                Some(a) => gauge.set(i64::from(a)),
                None => gauge.set(-1),
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Acks settled deliveries, dead-lettering each failed one first. A message that cannot be
/// dead-lettered is returned to the queue, never dropped.
///
/// Acks go out in delivery-tag order, as one `multiple` ack per run of settled tags: RabbitMQ
/// handles in-order acks at the head of its unacked list, while acks in random order (which is
/// how a pipeline of shards and writers finishes) cost it a search each and capped throughput at
/// a fifth of what it can deliver. A tag still in flight holds back the acks after it; each settled
/// delivery waits at most `STRAGGLER` from when it settled, then is acked on its own.
async fn settler(
    mut rx: UnboundedReceiver<Settled>,
    mut reads: UnboundedReceiver<(u64, u64)>,
    dl: Arc<Mutex<Option<Channel>>>,
    broker: Broker,
) {
    let mut book = Book { order: InOrder::default(), session: 0 };
    loop {
        let next_straggler = book.order.next_straggler(STRAGGLER).unwrap_or_else(Instant::now);
        let first = tokio::select! {
            s = rx.recv() => s,
            _ = tokio::time::sleep_until(next_straggler.into()), if book.order.is_waiting() => {
                ack_stragglers(&mut book).await;
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
        // Every delivery was announced before the pipeline saw it, so before it could settle.
        while let Ok(read) = reads.try_recv() {
            book.read(read);
        }
        for s in batch {
            let Some(record) = s.position.into_inner::<Record>() else {
                // Not one of ours: cannot happen, as only this source makes these guards.
                tracing::error!("a settled delivery did not come from this source");
                continue;
            };
            let requeue = match &s.status {
                // From a session that is gone: its ack would fail and the broker redelivers it, so
                // dead-lettering it now would dead-letter it twice. It is dealt with on redelivery.
                Status::DeadLettered(_) if !record.acker.usable() => false,
                Status::DeadLettered(f) => !dead_letter_one(&dl, &broker, &record, f).await,
                Status::Persisted => false,
            };
            let done = Done { record, sent_at: s.sent_at, received: s.received, _work: s.work };
            settle_one(&mut book, done, requeue).await;
        }
        ack_in_order(&mut book).await;
        ack_stragglers(&mut book).await;
    }
}

/// How long a settled delivery's ack may wait behind a delivery still being processed. About two
/// write rounds of a busy writer: writers finish their rounds at different times, and with 200 ms
/// (counted, before, from when the first of them settled) most acks went out one by one, which
/// cost the broker more CPU than the connector itself and cut end-to-end throughput.
const STRAGGLER: Duration = Duration::from_secs(1);

async fn dead_letter_one(dl: &Mutex<Option<Channel>>, broker: &Broker, r: &Record, f: &Failure) -> bool {
    let channel = dl.lock().ok().and_then(|c| c.clone());
    let published = match channel {
        Some(ch) => {
            let origin = Origin { queue: &r.queue, exchange: &r.exchange, routing_key: &r.routing_key };
            dead_letter(&ch, broker, &r.body, &r.properties, &origin, f).await
        }
        None => Err("no broker connection".into()),
    };
    match published {
        Ok(()) => {
            book_dead_lettered(f.kind, &f.message);
            true
        }
        Err(e) => {
            tracing::error!(kind = %f.kind, error = %e, "could not dead-letter a message; returning it to the queue");
            false
        }
    }
}

/// The in-order acks of the current broker session: deliveries by (session, tag).
struct Book {
    order: InOrder<(u64, u64), Done>,
    session: u64,
}

impl Book {
    /// A delivery was handed to the pipeline. The first of a new session voids what waited for the
    /// old one: its tags can no longer be acked, and the broker redelivers those messages.
    fn read(&mut self, (session, tag): (u64, u64)) {
        if session > self.session {
            self.order.clear().iter().for_each(|old| count(old, false));
            self.session = session;
        }
        self.order.read((session, tag));
    }
}

fn count(d: &Done, acked: bool) {
    book_settled(d.sent_at, d.received, acked);
}

async fn settle_one(book: &mut Book, d: Done, requeue: bool) {
    let at = (d.record.session, d.record.tag);
    if requeue && at.0 == book.session {
        // Returned to the queue at once, on its own: nothing waits for it.
        let _ = d.record.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
        book.order.forget(at);
        count(&d, false);
        return;
    }
    // A stale session's delivery: its tag is void (the broker redelivers the message).
    if let Err(d) = book.order.settle(at, d, Instant::now()) {
        count(&d, false);
    }
}

/// One `multiple` ack for the run of settled tags at the head.
async fn ack_in_order(book: &mut Book) {
    let run = book.order.release();
    if let Some(last) = run.last() {
        let ok = last.record.acker.ack(BasicAckOptions { multiple: true }).await.unwrap_or(false);
        if !ok {
            tracing::debug!("ack not sent (channel closed); the broker will redeliver");
        }
        for d in &run {
            count(d, ok);
        }
    }
}

/// Acks, one by one, what has waited `STRAGGLER` behind a tag still in flight.
async fn ack_stragglers(book: &mut Book) {
    for d in book.order.stragglers(Instant::now(), STRAGGLER) {
        let ok = d.record.acker.ack(BasicAckOptions::default()).await.unwrap_or(false);
        count(&d, ok);
    }
}
