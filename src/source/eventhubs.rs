//! Azure Event Hubs (AMQP 1.0, Microsoft's `azure_messaging_eventhubs`): the evaluation envelope of
//! an event, partition ownership shared with the other instances of the consumer group, in-order
//! checkpoints, and dead letters sent to a dead-letter hub. No Event Hubs type leaves this module.
//!
//! Every instance runs one coordinator. Each balancing round it renews what it owns, then claims
//! at most one partition (`balance::next_claim`) in the PostgreSQL store (`store`). For each partition
//! it owns, a reader opens a receiver with the ownership's version as its owner level (epoch), so
//! the service cuts off a previous owner that has not noticed yet. The reader hands events to the
//! pipeline, pauses when `max_in_flight` are unsettled (the held-messages rule of a FHIR outage),
//! and moves the checkpoint only past events that are persisted or dead-lettered (`book`).

mod balance;
mod book;
mod source;
pub mod store;

pub use source::EventHubsSource;

use crate::config::{EventHubs, EventHubsAuth, StartAt};
use crate::metrics;
use crate::source::{DeliveryGuard, Failure, Intake, Position, Settled, Status, book_dead_lettered, book_settled};
use crate::status::{PartitionState, Shared};
use azure_core_amqp::message::{AmqpAnnotationKey, AmqpMessageBody, AmqpMessageId};
use azure_core_amqp::{AmqpMessage, AmqpSimpleValue, AmqpTimestamp, AmqpValue};
use azure_messaging_eventhubs::models::{EventData, ReceivedEventData};
use azure_messaging_eventhubs::{ConsumerClient, OpenReceiverOptions, ProducerClient, StartLocation, StartPosition};
use book::Book;
use futures_util::StreamExt;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};
use store::{Checkpoint, PgStore, Scope};
use tokio::sync::{mpsc, watch};

pub const ERROR_KIND_PROPERTY: &str = "x-iomt-error-kind";
pub const ERROR_PROPERTY: &str = "x-iomt-error";
/// The send time a sender may stamp (epoch milliseconds), as on RabbitMQ.
pub const SENT_AT_PROPERTY: &str = "x-iomt-sent-at";

/// What went wrong with the hub or the checkpoint store, in words naming the setting to check.
#[derive(Debug, thiserror::Error)]
pub enum EventHubsError {
    #[error("event hub {hub}: {message}")]
    Hub { hub: String, message: String },
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

fn hub_error(hub: &str, e: impl std::fmt::Display) -> EventHubsError {
    EventHubsError::Hub { hub: hub.to_string(), message: e.to_string() }
}

/// The connection string without `EntityPath`: the hub is always named separately, so that one
/// connection string serves the source hub and the dead-letter hub.
fn namespace_connection_string(cs: &str) -> String {
    cs.split(';')
        .filter(|kv| !kv.trim().is_empty() && !kv.trim().to_ascii_lowercase().starts_with("entitypath="))
        .collect::<Vec<_>>()
        .join(";")
}

/// A consumer of `hub` with the configured credentials.
pub async fn consumer(s: &EventHubs, hub: &str) -> Result<ConsumerClient, EventHubsError> {
    let mut b = ConsumerClient::builder().with_consumer_group(s.consumer_group.clone());
    if !s.custom_endpoint.is_empty() {
        b = b.with_custom_endpoint(s.custom_endpoint.clone());
    }
    let opened = match s.auth {
        EventHubsAuth::ConnectionString => {
            b.open_with_connection_string(&namespace_connection_string(&s.connection_string), Some(hub)).await
        }
        EventHubsAuth::Entra => b.open(&s.namespace, hub.to_string(), entra::credential(s)).await,
    };
    opened.map_err(|e| hub_error(hub, e))
}

/// A producer for `hub` (the dead-letter hub, or `publish`/`simulate`'s target).
pub async fn producer(s: &EventHubs, hub: &str) -> Result<ProducerClient, EventHubsError> {
    let mut b = ProducerClient::builder();
    if !s.custom_endpoint.is_empty() {
        b = b.with_custom_endpoint(s.custom_endpoint.clone());
    }
    let opened = match s.auth {
        EventHubsAuth::ConnectionString => {
            b.open_with_connection_string(&namespace_connection_string(&s.connection_string), Some(hub)).await
        }
        EventHubsAuth::Entra => b.open(&s.namespace, hub, entra::credential(s)).await,
    };
    opened.map_err(|e| hub_error(hub, e))
}

mod entra {
    //! Microsoft Entra client credentials through the project's own OAuth2 client (the one the FHIR
    //! writer uses): one token cache and one retry rule for both.
    use crate::config::EventHubs;
    use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
    use std::sync::Arc;

    #[derive(Debug)]
    struct Entra(Arc<crate::fhir::auth::OAuth2>);

    pub fn credential(s: &EventHubs) -> Arc<dyn TokenCredential> {
        let url = format!("{}/{}/oauth2/v2.0/token", s.authority_host.trim_end_matches('/'), s.tenant_id);
        let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30)).build().unwrap_or_default();
        let scope = "https://eventhubs.azure.net/.default";
        Arc::new(Entra(Arc::new(crate::fhir::auth::OAuth2::client_credentials(
            http,
            url,
            s.client_id.clone(),
            s.client_secret.clone(),
            scope.into(),
        ))))
    }

    #[async_trait::async_trait]
    impl TokenCredential for Entra {
        async fn get_token(
            &self,
            _scopes: &[&str],
            _options: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            let (token, ttl) = self.0.token_with_ttl().await.map_err(|e| {
                azure_core::Error::with_message(azure_core::error::ErrorKind::Credential, e.to_string())
            })?;
            let expires = azure_core::time::OffsetDateTime::now_utc() + ttl;
            Ok(AccessToken::new(token, expires))
        }
    }
}

// ------------------------------------------------------------------------------------ envelope

/// `{"Body", "Properties", "SystemProperties"}` of an event, as iomt-fhir builds it from the
/// .NET `EventData`: the body parsed as JSON (`null` when empty), the application properties, and
/// the system properties: the AMQP properties section's fields that are set, then every message
/// annotation (`x-opt-sequence-number`, `x-opt-offset`, `x-opt-enqueued-time`, IoT Hub's
/// `iothub-connection-device-id`, ...). `Err` when the body is not JSON.
pub fn envelope(m: &AmqpMessage) -> Result<Value, String> {
    let body = crate::source::body_json(&body_bytes(m), "event")?;
    let mut properties = Map::new();
    if let Some(app) = &m.application_properties {
        for (k, v) in app.0.iter() {
            properties.insert(k.clone(), simple_json(v));
        }
    }
    let mut system = Map::new();
    if let Some(p) = &m.properties {
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                system.insert(k.to_string(), v);
            }
        };
        put("message-id", p.message_id.as_ref().map(message_id_json));
        put("user-id", p.user_id.as_ref().map(|u| Value::String(azure_core::base64::encode(u))));
        put("to", p.to.clone().map(Value::String));
        put("subject", p.subject.clone().map(Value::String));
        put("reply-to", p.reply_to.clone().map(Value::String));
        put("correlation-id", p.correlation_id.as_ref().map(message_id_json));
        put("content-type", p.content_type.as_ref().map(|s| Value::String(s.0.clone())));
        put("content-encoding", p.content_encoding.as_ref().map(|s| Value::String(s.0.clone())));
        put("absolute-expiry-time", p.absolute_expiry_time.as_ref().map(timestamp_json));
        put("creation-time", p.creation_time.as_ref().map(timestamp_json));
        put("group-id", p.group_id.clone().map(Value::String));
        put("group-sequence", p.group_sequence.map(|n| json!(n)));
        put("reply-to-group-id", p.reply_to_group_id.clone().map(Value::String));
    }
    if let Some(a) = &m.message_annotations {
        for (k, v) in a.0.iter() {
            system.insert(annotation_key(k), value_json(v));
        }
    }
    Ok(crate::source::envelope(body, properties, system))
}

fn body_bytes(m: &AmqpMessage) -> Vec<u8> {
    match &m.body {
        AmqpMessageBody::Binary(sections) => sections.concat(),
        AmqpMessageBody::Value(AmqpValue::String(s)) => s.clone().into_bytes(),
        AmqpMessageBody::Value(AmqpValue::Binary(b)) => b.clone(),
        AmqpMessageBody::Value(AmqpValue::Null) | AmqpMessageBody::Empty => Vec::new(),
        // A body that is an AMQP value or list is not a JSON document; say so as a parse error.
        AmqpMessageBody::Value(v) => format!("{v:?}").into_bytes(),
        AmqpMessageBody::Sequence(_) => b"(an AMQP sequence body)".to_vec(),
    }
}

fn annotation_key(k: &AmqpAnnotationKey) -> String {
    match k {
        AmqpAnnotationKey::Symbol(s) => s.0.clone(),
        AmqpAnnotationKey::Ulong(n) => n.to_string(),
    }
}

fn message_id_json(id: &AmqpMessageId) -> Value {
    match id {
        AmqpMessageId::String(s) => Value::String(s.clone()),
        AmqpMessageId::Uuid(u) => Value::String(u.to_string()),
        AmqpMessageId::Binary(b) => Value::String(azure_core::base64::encode(b)),
        AmqpMessageId::Ulong(n) => json!(n),
    }
}

/// As Json.NET writes a UTC `DateTime`: seconds fraction without trailing zeros, `Z`.
fn timestamp_json(t: &AmqpTimestamp) -> Value {
    match t.0 {
        Some(t) => Value::String(iso_time(t)),
        None => Value::Null,
    }
}

fn iso_time(t: SystemTime) -> String {
    let t: chrono::DateTime<chrono::Utc> = t.into();
    // .NET keeps 100 ns ticks: seven digits at most, trailing zeros dropped.
    let s = t.format("%Y-%m-%dT%H:%M:%S%.9f").to_string();
    let s = &s[..s.len() - 2];
    format!("{}Z", s.trim_end_matches('0').trim_end_matches('.'))
}

fn simple_json(v: &AmqpSimpleValue) -> Value {
    match v {
        AmqpSimpleValue::Null => Value::Null,
        AmqpSimpleValue::Boolean(b) => json!(b),
        AmqpSimpleValue::UByte(n) => json!(n),
        AmqpSimpleValue::Byte(n) => json!(n),
        AmqpSimpleValue::Char(c) => json!(c.to_string()),
        AmqpSimpleValue::UShort(n) => json!(n),
        AmqpSimpleValue::Short(n) => json!(n),
        AmqpSimpleValue::UInt(n) => json!(n),
        AmqpSimpleValue::Int(n) => json!(n),
        AmqpSimpleValue::ULong(n) => json!(n),
        AmqpSimpleValue::Long(n) => json!(n),
        AmqpSimpleValue::Float(f) => json!(f),
        AmqpSimpleValue::Double(f) => json!(f),
        AmqpSimpleValue::TimeStamp(t) => timestamp_json(t),
        AmqpSimpleValue::Uuid(u) => json!(u.to_string()),
        AmqpSimpleValue::String(s) => json!(s),
        AmqpSimpleValue::Symbol(s) => json!(s.0),
        AmqpSimpleValue::Binary(b) => json!(azure_core::base64::encode(b)),
        other => json!(format!("{other:?}")),
    }
}

fn value_json(v: &AmqpValue) -> Value {
    match v {
        AmqpValue::Null => Value::Null,
        AmqpValue::Boolean(b) => json!(b),
        AmqpValue::UByte(n) => json!(n),
        AmqpValue::UShort(n) => json!(n),
        AmqpValue::UInt(n) => json!(n),
        AmqpValue::ULong(n) => json!(n),
        AmqpValue::Byte(n) => json!(n),
        AmqpValue::Short(n) => json!(n),
        AmqpValue::Int(n) => json!(n),
        AmqpValue::Long(n) => json!(n),
        AmqpValue::Float(f) => json!(f),
        AmqpValue::Double(f) => json!(f),
        AmqpValue::Char(c) => json!(c.to_string()),
        AmqpValue::TimeStamp(t) => timestamp_json(t),
        AmqpValue::Uuid(u) => json!(u.to_string()),
        AmqpValue::Binary(b) => json!(azure_core::base64::encode(b)),
        AmqpValue::String(s) => json!(s),
        AmqpValue::Symbol(s) => json!(s.0),
        AmqpValue::List(l) => Value::Array(l.0.iter().map(value_json).collect()),
        AmqpValue::Array(a) => Value::Array(a.iter().map(value_json).collect()),
        AmqpValue::Map(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let key = match k {
                        AmqpValue::String(s) => s.clone(),
                        AmqpValue::Symbol(s) => s.0.clone(),
                        other => value_json(other).to_string(),
                    };
                    (key, value_json(v))
                })
                .collect(),
        ),
        other => json!(format!("{other:?}")),
    }
}

fn sent_at(m: &AmqpMessage) -> Option<SystemTime> {
    let v = m.application_properties.as_ref()?.0.get(SENT_AT_PROPERTY)?;
    let ms = match v {
        AmqpSimpleValue::Long(n) => *n,
        AmqpSimpleValue::ULong(n) => *n as i64,
        AmqpSimpleValue::Int(n) => i64::from(*n),
        _ => return None,
    };
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(u64::try_from(ms).ok()?))
}

// ------------------------------------------------------------------------------------ the source

/// What the source keeps of an event until it is settled.
struct Record {
    partition: Arc<str>,
    at: Checkpoint,
    /// For the dead-letter hub: the original message.
    message: AmqpMessage,
}

/// The running Event Hubs source.
pub struct Running {
    stop: watch::Sender<Phase>,
    coordinator: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd)]
enum Phase {
    Running,
    /// No new events; what was handed over is still settled and checkpointed.
    StopTaking,
    /// Write the last checkpoints, give the partitions up, end.
    Close,
}

impl Running {
    pub async fn stop_taking(&mut self) {
        let _ = self.stop.send(Phase::StopTaking);
    }

    /// Writes the final checkpoints and releases the partitions (for at most 10 s).
    pub async fn close(mut self) {
        let _ = self.stop.send(Phase::Close);
        if let Some(c) = self.coordinator.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), c).await;
        }
    }
}

/// This instance's name in the ownership table.
fn instance_id(s: &EventHubs) -> String {
    if !s.instance_id.is_empty() {
        return s.instance_id.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "host".into());
    format!("{}-{}-{:04x}", host.trim(), std::process::id(), fastrand::u16(..))
}

pub fn start(settings: EventHubs, intake: Arc<dyn Intake>, shared: Arc<Shared>) -> Running {
    let (stop, stop_rx) = watch::channel(Phase::Running);
    let coordinator = actix_rt::spawn(coordinate(settings, intake, shared, stop_rx));
    Running { stop, coordinator: Some(coordinator) }
}

/// Everything a partition reader needs, shared.
struct Ctx {
    s: EventHubs,
    hub: String,
    me: String,
    consumer: ConsumerClient,
    dead_letters: ProducerClient,
    store: PgStore,
    intake: Arc<dyn Intake>,
    shared: Arc<Shared>,
    /// Per partition, held by a reader from opening its receiver to closing it. The SDK closes
    /// a receiver by the partition's address, so a reader of a lost partition that closes late
    /// (held up settling) would otherwise detach the receiver of the reader that claimed the
    /// partition back.
    links: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Ctx {
    fn link_lock(&self, partition: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut links = self.links.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        links.entry(partition.to_string()).or_default().clone()
    }
}

/// A partition this instance reads.
struct Owned {
    version: i64,
    /// Tells the reader to stop (lost, or the whole source stops).
    stop: watch::Sender<Phase>,
    reader: tokio::task::JoinHandle<()>,
}

async fn connect(
    s: &EventHubs,
    intake: &Arc<dyn Intake>,
    shared: &Arc<Shared>,
    me: &str,
) -> Result<(Ctx, Vec<String>), EventHubsError> {
    let hub = s.hub_name();
    let scope = Scope { namespace: s.namespace_host(), hub: hub.clone(), consumer_group: s.consumer_group.clone() };
    let store = PgStore::open(&s.checkpoint_postgres_url, scope).await?;
    let consumer = consumer(s, &hub).await?;
    let props = consumer.get_eventhub_properties().await.map_err(|e| hub_error(&hub, e))?;
    let dead_letters = producer(s, &s.dead_letter_hub).await?;
    tracing::info!(hub = %hub, partitions = props.partition_ids.len(), consumer_group = %s.consumer_group, instance = %me, "connected to the event hub");
    let ctx = Ctx {
        s: s.clone(),
        hub,
        me: me.to_string(),
        consumer,
        dead_letters,
        store,
        intake: intake.clone(),
        shared: shared.clone(),
        links: Default::default(),
    };
    Ok((ctx, props.partition_ids))
}

async fn coordinate(s: EventHubs, intake: Arc<dyn Intake>, shared: Arc<Shared>, mut stop: watch::Receiver<Phase>) {
    let me = instance_id(&s);
    let delay = Duration::from_secs(2);
    let (ctx, partitions) = loop {
        if *stop.borrow() != Phase::Running {
            return;
        }
        match connect(&s, &intake, &shared, &me).await {
            Ok((ctx, partitions)) => break (Arc::new(ctx), partitions),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_s = delay.as_secs(), "cannot reach the event hub or its checkpoint store; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    };
    shared.broker_connected.store(true, Ordering::SeqCst);
    let expiry = Duration::from_secs(s.ownership_expiry_secs);
    let mut owned: HashMap<String, Owned> = HashMap::new();
    let interval = Duration::from_secs(s.balance_interval_secs);
    let connected = tokio::time::Instant::now();
    let mut round = tokio::time::interval(interval);
    round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut dropped = false;
        tokio::select! {
            _ = round.tick() => {}
            changed = stop.changed() => dropped = changed.is_err(),
        }
        // The handle gone without a close: the process is ending; close as well.
        let phase = if dropped { Phase::Close } else { *stop.borrow() };
        if phase != Phase::Running {
            // Readers finish what they were handed, then checkpoint and end on Close.
            for o in owned.values() {
                let _ = o.stop.send(phase);
            }
            if phase == Phase::Close {
                for (p, o) in owned.drain() {
                    let _ = tokio::time::timeout(Duration::from_secs(5), o.reader).await;
                    if let Err(e) = ctx.store.release(&me, &p, o.version).await {
                        tracing::warn!(partition = %p, error = %e, "could not release the partition; it is taken over when its ownership expires");
                    }
                    shared.partitions.remove(&p);
                }
                metrics::get().partitions_owned.set(0);
                return;
            }
            continue;
        }
        let claimed_free = balance_round(&ctx, &partitions, &mut owned, expiry).await;
        metrics::get().partitions_owned.set(owned.len() as i64);
        if claimed_free && connected.elapsed() >= interval {
            // Waiting a whole interval after each free claim would leave a lone instance reading
            // one more partition every interval (32 partitions at 5 s: almost three minutes). For
            // its first interval an instance claims one per round, so that instances starting
            // together see each other before they share the hub out; otherwise the first would
            // take everything and the others would steal, and each partition stolen is read again
            // from its checkpoint.
            round.reset_after(FREE_CLAIM_PAUSE);
        } else {
            lag(&ctx, &owned).await;
        }
    }
}

/// Between a round that claimed a free partition and the next: long enough for instances that
/// start together to see each other's claims, short enough that a hub is read in full at once.
const FREE_CLAIM_PAUSE: Duration = Duration::from_millis(100);

/// One round: drop readers that ended, renew, claim one partition if it is our turn. `true` when
/// it claimed, or raced another instance for, a partition nobody held.
async fn balance_round(
    ctx: &Arc<Ctx>,
    partitions: &[String],
    owned: &mut HashMap<String, Owned>,
    expiry: Duration,
) -> bool {
    let me = &ctx.me;
    owned.retain(|p, o| {
        let alive = !o.reader.is_finished();
        if !alive {
            tracing::info!(partition = %p, "partition reader ended; its ownership is given up");
            ctx.shared.partitions.remove(p);
        }
        alive
    });
    let held: Vec<(String, i64)> = owned.iter().map(|(p, o)| (p.clone(), o.version)).collect();
    match ctx.store.renew(me, &held).await {
        Ok(kept) => {
            for (p, _) in held.iter().filter(|(p, _)| !kept.contains(p)) {
                tracing::info!(partition = %p, "partition taken over by another instance; stopping its reader");
                // Not Close: the reader still books what the pipeline settles of its events.
                if let Some(o) = owned.remove(p) {
                    let _ = o.stop.send(Phase::StopTaking);
                }
                ctx.shared.partitions.remove(p);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not renew partition ownership");
            return false;
        }
    }
    let rows = match ctx.store.ownerships().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "could not read partition ownership");
            return false;
        }
    };
    let Some(claim) = balance::next_claim(me, partitions, &rows, expiry) else { return false };
    match ctx.store.claim(me, &claim).await {
        Ok(Some(version)) => {
            let from =
                rows.iter().find(|r| r.partition == claim.partition).map(|r| r.owner.clone()).unwrap_or_default();
            tracing::info!(partition = %claim.partition, owner_level = version, from = %from, "claimed a partition");
            let (stop, stop_rx) = watch::channel(Phase::Running);
            let state = PartitionState::new(&claim.partition, version);
            ctx.shared.partitions.insert(claim.partition.clone(), state.clone());
            let reader = actix_rt::spawn(read_partition(ctx.clone(), claim.partition.clone(), version, state, stop_rx));
            owned.insert(claim.partition, Owned { version, stop, reader });
            claim.free
        }
        Ok(None) => {
            tracing::debug!(partition = %claim.partition, "another instance claimed it first");
            claim.free
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not claim a partition");
            false
        }
    }
}

/// Checkpoint lag per owned partition: events enqueued after the checkpoint.
async fn lag(ctx: &Ctx, owned: &HashMap<String, Owned>) {
    for p in owned.keys() {
        let Some(state) = ctx.shared.partitions.get(p).map(|s| s.clone()) else { continue };
        if let Ok(props) = ctx.consumer.get_partition_properties(p).await {
            state.last_enqueued.store(props.last_enqueued_sequence_number, Ordering::Relaxed);
            let lag = (props.last_enqueued_sequence_number - state.checkpoint.load(Ordering::Relaxed)).max(0);
            metrics::get().checkpoint_lag.with_label_values(&[p]).set(lag);
        }
    }
}

async fn start_position(ctx: &Ctx, partition: &str) -> Result<(StartPosition, Option<Checkpoint>), EventHubsError> {
    let cp = ctx.store.checkpoint(partition).await?;
    let position = match &cp {
        // Everything up to it is persisted or dead-lettered: on from the next.
        Some(c) => StartPosition { location: StartLocation::SequenceNumber(c.sequence_number), inclusive: false },
        None => match ctx.s.start_position() {
            Some(StartAt::Latest) => StartPosition { location: StartLocation::Latest, inclusive: false },
            Some(StartAt::Enqueued(t)) => {
                StartPosition { location: StartLocation::EnqueuedTime(t.into()), inclusive: true }
            }
            Some(StartAt::Earliest) | None => StartPosition { location: StartLocation::Earliest, inclusive: false },
        },
    };
    Ok((position, cp))
}

/// Reads one partition until told to stop or cut off, checkpointing as events settle.
async fn read_partition(
    ctx: Arc<Ctx>,
    partition: String,
    version: i64,
    state: Arc<PartitionState>,
    mut stop: watch::Receiver<Phase>,
) {
    let pid: Arc<str> = partition.as_str().into();
    let (to_reader, mut settled) = mpsc::unbounded_channel::<Settled>();
    let mut book = Book::default();
    let mut last_read: Option<i64> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(ctx.s.checkpoint_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let events_total = metrics::get().partition_events.with_label_values(&[&partition]);
    'session: loop {
        if *stop.borrow() != Phase::Running {
            break;
        }
        // From the checkpoint the first time; after a dropped link, from the last event read.
        let position = match last_read {
            Some(seq) => StartPosition { location: StartLocation::SequenceNumber(seq), inclusive: false },
            None => match start_position(&ctx, &partition).await {
                Ok((p, cp)) => {
                    if let Some(c) = cp {
                        state.checkpoint.store(c.sequence_number, Ordering::Relaxed);
                    }
                    p
                }
                Err(e) => {
                    tracing::warn!(partition = %partition, error = %e, "cannot read the checkpoint; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            },
        };
        let options = OpenReceiverOptions {
            owner_level: Some(version),
            prefetch: Some(ctx.s.max_in_flight.min(1000) as u32),
            start_position: Some(position),
            receive_timeout: None,
        };
        let link = tokio::select! {
            held = ctx.link_lock(&partition).lock_owned() => held,
            changed = stop.changed() => {
                if changed.is_err() {
                    break 'session;
                }
                continue 'session;
            }
        };
        let receiver = match ctx.consumer.open_receiver_on_partition(partition.clone(), Some(options)).await {
            Ok(r) => r,
            Err(e) => {
                if stolen(&e) {
                    tracing::info!(partition = %partition, "another instance took the partition (higher owner level)");
                    break 'session;
                }
                tracing::warn!(partition = %partition, error = %e, "cannot open a receiver on the partition; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        let mut events = Box::pin(receiver.stream_events());
        let ended = loop {
            let taking = *stop.borrow() == Phase::Running && book.in_flight() < ctx.s.max_in_flight;
            tokio::select! {
                next = events.next(), if taking => match next {
                    Some(Ok(event)) => {
                        events_total.inc();
                        if let Some(seq) = handle(&ctx, &pid, &event, &to_reader, &mut book) {
                            last_read = Some(seq);
                        }
                    }
                    Some(Err(e)) => {
                        if stolen(&e) {
                            tracing::info!(partition = %partition, "another instance took the partition (higher owner level)");
                            break Session::Over;
                        }
                        tracing::warn!(partition = %partition, error = %e, "partition receiver failed; reopening");
                        break Session::Reopen(Duration::from_secs(1));
                    }
                    None => break Session::Reopen(Duration::ZERO),
                },
                Some(s) = settled.recv() => settle(&ctx, s, &mut book).await,
                _ = tick.tick() => {
                    if !write_checkpoint(&ctx, &partition, version, &mut book, &state).await {
                        break Session::Over;
                    }
                }
                changed = stop.changed() => {
                    // Closed: the coordinator gave the partition up (lost to another instance).
                    if changed.is_err() || *stop.borrow() == Phase::Close {
                        break Session::Over;
                    }
                }
            }
        };
        // Closed, not just dropped: the client keeps a dropped receiver's link, and a later
        // receiver on this partition (it coming back to this instance) would find that stale,
        // stolen link, fail, and take the whole connection (every partition) into a loop of
        // recoveries.
        drop(events);
        // Briefly: on a stop, the last checkpoint is still to be written within the
        // coordinator's 5 s.
        match tokio::time::timeout(Duration::from_secs(1), receiver.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(partition = %partition, error = %e, "closing the partition receiver"),
            Err(_) => tracing::debug!(partition = %partition, "closing the partition receiver timed out"),
        }
        drop(link);
        match ended {
            Session::Over => break 'session,
            Session::Reopen(pause) => tokio::time::sleep(pause).await,
        }
    }
    // What was handed over still settles: book it (dead letters included), so that the counts
    // stay true and a stop does not wait for settlements nobody reads, then write the last
    // checkpoint (refused if the partition has a new owner). On a stop the pipeline has already
    // settled what it could; after a takeover the pipeline is still working on them.
    drop(to_reader);
    let closing = *stop.borrow() == Phase::Close;
    let deadline =
        tokio::time::Instant::now() + if closing { Duration::from_secs(5) } else { Duration::from_secs(600) };
    while book.in_flight() > 0 {
        match tokio::time::timeout_at(deadline, settled.recv()).await {
            Ok(Some(s)) => settle(&ctx, s, &mut book).await,
            _ => break,
        }
    }
    write_checkpoint(&ctx, &partition, version, &mut book, &state).await;
    metrics::get().checkpoint_lag.remove_label_values(&[&partition]).ok();
}

/// How a receiver's session on a partition ended.
enum Session {
    /// The partition is no longer read here (stopped, closed, or taken by another instance).
    Over,
    /// The link failed or ended: a new receiver, after this pause, from the last event read.
    Reopen(Duration),
}

fn stolen(e: &azure_messaging_eventhubs::EventHubsError) -> bool {
    matches!(e.kind, azure_messaging_eventhubs::error::ErrorKind::ConsumerDisconnected(_))
}

/// Hands one event to the pipeline; its sequence number.
fn handle(
    ctx: &Ctx,
    pid: &Arc<str>,
    event: &ReceivedEventData,
    to_reader: &mpsc::UnboundedSender<Settled>,
    book: &mut Book,
) -> Option<i64> {
    let message = event.raw_amqp_message();
    let Some(seq) = event.sequence_number() else {
        // Event Hubs stamps every event; one without a position cannot be checkpointed in order,
        // so it is not taken (the peer at the other end is not Event Hubs).
        tracing::error!(partition = %pid, "an event without x-opt-sequence-number was not processed: the endpoint does not behave as Event Hubs");
        return None;
    };
    let at = Checkpoint {
        offset: event.offset().clone().unwrap_or_default(),
        sequence_number: seq,
        enqueued_time: event.enqueued_time().map(chrono::DateTime::<chrono::Utc>::from),
    };
    book.read(at.clone());
    crate::source::book_received();
    let record = Record { partition: pid.clone(), at, message: message.clone() };
    let guard = Arc::new(DeliveryGuard::new(Position::new(record), sent_at(message), to_reader.clone()));
    ctx.intake.accept(envelope(message), guard);
    Some(seq)
}

/// A settled event: dead-lettered first if it failed (retried until the dead-letter hub takes it:
/// the checkpoint cannot pass an event that is neither persisted nor dead-lettered).
async fn settle(ctx: &Ctx, s: Settled, book: &mut Book) {
    let Some(record) = s.position.into_inner::<Record>() else {
        tracing::error!("a settled delivery did not come from this source");
        return;
    };
    if let Status::DeadLettered(f) = &s.status {
        let mut wait = Duration::from_millis(200);
        loop {
            match dead_letter(ctx, &record, f).await {
                Ok(()) => {
                    book_dead_lettered(f.kind, &f.message);
                    break;
                }
                Err(e) => {
                    tracing::error!(kind = %f.kind, partition = %record.partition, error = %e, "could not send a dead letter to the dead-letter hub; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
    book.settled(record.at.sequence_number);
    book_settled(s.sent_at, s.received, true);
}

/// The original event to the dead-letter hub: body, properties and application properties as
/// they were, the reason in `x-iomt-error-kind` / `x-iomt-error`, and where it came from.
async fn dead_letter(ctx: &Ctx, r: &Record, f: &Failure) -> Result<(), EventHubsError> {
    let mut m = r.message.clone();
    let app = m.application_properties.get_or_insert_with(Default::default);
    app.0.insert(ERROR_KIND_PROPERTY.into(), AmqpSimpleValue::String(f.kind.as_str().into()));
    app.0.insert(ERROR_PROPERTY.into(), AmqpSimpleValue::String(f.message.clone()));
    app.0.insert("x-iomt-source-hub".into(), AmqpSimpleValue::String(ctx.hub.clone()));
    app.0.insert("x-iomt-source-partition".into(), AmqpSimpleValue::String(r.partition.to_string()));
    app.0.insert("x-iomt-source-sequence-number".into(), AmqpSimpleValue::Long(r.at.sequence_number));
    // The service stamps its own x-opt-* annotations on the dead-letter hub; the originals would
    // be stale there.
    if let Some(a) = m.message_annotations.as_mut() {
        let stale: Vec<AmqpAnnotationKey> =
            a.0.iter().map(|(k, _)| k.clone()).filter(|k| annotation_key(k).starts_with("x-opt-")).collect();
        for k in stale {
            a.0.remove(&k);
        }
    }
    ctx.dead_letters.send_message(m, None).await.map_err(|e| hub_error(&ctx.s.dead_letter_hub, e))
}

/// Writes the checkpoint if it moved. `false` when this instance no longer owns the partition.
async fn write_checkpoint(ctx: &Ctx, partition: &str, version: i64, book: &mut Book, state: &PartitionState) -> bool {
    let Some(c) = book.take_unwritten() else { return true };
    match ctx.store.set_checkpoint(&ctx.me, version, partition, &c).await {
        Ok(true) => {
            state.checkpoint.store(c.sequence_number, Ordering::Relaxed);
            true
        }
        Ok(false) => {
            // Not ours any more (or already further): the new owner goes on from its own reading.
            match ctx.store.checkpoint(partition).await {
                Ok(Some(now)) if now.sequence_number >= c.sequence_number => true,
                _ => {
                    tracing::info!(partition = %partition, "checkpoint refused: the partition has a new owner");
                    false
                }
            }
        }
        Err(e) => {
            tracing::warn!(partition = %partition, error = %e, "could not write the checkpoint; retrying");
            book.unwrite(c);
            true
        }
    }
}

/// An event for `publish`/`simulate`: a JSON body with the send time stamped.
pub fn event(body: &[u8]) -> EventData {
    let now =
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default();
    EventData::builder()
        .with_body(body.to_vec())
        .with_content_type("application/json".into())
        .add_property(SENT_AT_PROPERTY.into(), now)
        .build()
}

/// Sends events to a hub in batches, each to the partition its key (the device id) hashes to, so
/// a device's events stay in order on one partition. `confirmed` counts events the hub accepted.
pub struct HubPublisher {
    producer: ProducerClient,
    hub: String,
    pending: Vec<(Option<String>, Vec<u8>)>,
    batch: usize,
    pub confirmed: u64,
    pub refused: u64,
}

impl HubPublisher {
    pub async fn connect(s: &EventHubs, hub: &str, batch: usize) -> Result<HubPublisher, EventHubsError> {
        let producer = producer(s, hub).await?;
        Ok(HubPublisher {
            producer,
            hub: hub.to_string(),
            pending: Vec::new(),
            batch: batch.clamp(1, 500),
            confirmed: 0,
            refused: 0,
        })
    }

    pub async fn send(&mut self, body: &[u8], key: Option<&str>) -> Result<(), EventHubsError> {
        self.pending.push((key.map(str::to_string), body.to_vec()));
        if self.pending.len() >= self.batch {
            self.flush().await?;
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), EventHubsError> {
        let hub = self.hub.clone();
        let mut by_key: std::collections::BTreeMap<Option<String>, Vec<Vec<u8>>> = Default::default();
        for (k, b) in self.pending.drain(..) {
            by_key.entry(k).or_default().push(b);
        }
        for (key, bodies) in by_key {
            let options = || azure_messaging_eventhubs::EventDataBatchOptions {
                partition_key: key.clone(),
                ..Default::default()
            };
            let mut batch = self.producer.create_batch(Some(options())).await.map_err(|e| hub_error(&hub, e))?;
            for b in bodies {
                if !batch.try_add_event_data(event(&b), None).map_err(|e| hub_error(&hub, e))? {
                    let n = batch.len() as u64;
                    self.producer.send_batch(batch, None).await.map_err(|e| hub_error(&hub, e))?;
                    self.confirmed += n;
                    batch = self.producer.create_batch(Some(options())).await.map_err(|e| hub_error(&hub, e))?;
                    if !batch.try_add_event_data(event(&b), None).map_err(|e| hub_error(&hub, e))? {
                        self.refused += 1;
                        tracing::error!(
                            bytes = b.len(),
                            "an event is larger than the hub's maximum message size; not sent"
                        );
                    }
                }
            }
            if !batch.is_empty() {
                let n = batch.len() as u64;
                self.producer.send_batch(batch, None).await.map_err(|e| hub_error(&hub, e))?;
                self.confirmed += n;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core_amqp::AmqpSymbol;
    use azure_core_amqp::message::{AmqpAnnotations, AmqpApplicationProperties, AmqpMessageProperties};

    #[test]
    fn an_iot_hub_routed_event_becomes_the_envelope_iomt_fhir_builds() {
        let mut app = AmqpApplicationProperties::new();
        app.0.insert("iothub-creation-time-utc".into(), AmqpSimpleValue::String("2019-01-30T22:45:02.6073744Z".into()));
        app.0.insert("batchsize".into(), AmqpSimpleValue::String("60".into()));
        let mut ann = AmqpAnnotations::new();
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_549_061_161_875);
        ann.0.insert(
            AmqpAnnotationKey::Symbol(AmqpSymbol("iothub-connection-device-id".into())),
            AmqpValue::String("ev-d795".into()),
        );
        ann.0.insert(
            AmqpAnnotationKey::Symbol(AmqpSymbol("iothub-enqueuedtime".into())),
            AmqpValue::TimeStamp(AmqpTimestamp(Some(t))),
        );
        ann.0.insert(AmqpAnnotationKey::Symbol(AmqpSymbol("x-opt-sequence-number".into())), AmqpValue::Long(7));
        ann.0.insert(AmqpAnnotationKey::Symbol(AmqpSymbol("x-opt-offset".into())), AmqpValue::String("1024".into()));
        let m = AmqpMessage {
            body: AmqpMessageBody::Binary(vec![br#"{"heartrate": "#.to_vec(), br#""203"}"#.to_vec()]),
            application_properties: Some(app),
            message_annotations: Some(ann),
            properties: Some(AmqpMessageProperties {
                message_id: Some(AmqpMessageId::String("m-1".into())),
                content_type: Some(AmqpSymbol("application/json".into())),
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = envelope(&m).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e["Body"], json!({"heartrate": "203"}));
        assert_eq!(e["Properties"]["iothub-creation-time-utc"], "2019-01-30T22:45:02.6073744Z");
        let sys = &e["SystemProperties"];
        assert_eq!(sys["iothub-connection-device-id"], "ev-d795");
        assert_eq!(sys["iothub-enqueuedtime"], "2019-02-01T22:46:01.875Z");
        assert_eq!(sys["x-opt-sequence-number"], 7);
        assert_eq!(sys["x-opt-offset"], "1024");
        assert_eq!(sys["message-id"], "m-1");
        assert_eq!(sys["content-type"], "application/json");
    }

    #[test]
    fn an_empty_body_is_null_and_a_bad_one_is_an_error() {
        let m = AmqpMessage::default();
        assert_eq!(envelope(&m).map(|e| e["Body"].clone()), Ok(Value::Null));
        let bad = AmqpMessage { body: AmqpMessageBody::Binary(vec![b"{nope".to_vec()]), ..Default::default() };
        assert!(envelope(&bad).is_err_and(|e| e.contains("not valid JSON")));
    }

    #[test]
    fn entity_path_is_left_to_the_hub_setting() {
        let cs = "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=v;EntityPath=devices";
        assert_eq!(
            namespace_connection_string(cs),
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=v"
        );
    }
}
