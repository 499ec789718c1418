//! The seam between the brokers and the pipeline.
//!
//! A source (RabbitMQ today) turns each broker delivery into its evaluation envelope and a
//! [`DeliveryGuard`], and hands both to the pipeline's [`Intake`]. The guard carries the delivery's
//! [`Position`], opaque to the pipeline; every measurement and group derived from the message holds
//! a clone. When the last clone drops, the guard sends its [`Status`] (persisted, or dead-lettered
//! with the first failure's typed kind and text) back to its source, which alone knows how to ack,
//! checkpoint or dead-letter on its broker. The pipeline never sees a broker type; a source never
//! sees an actor.

pub mod budget;
pub mod eventhubs;
pub mod memory;
pub mod ordered;
pub mod rabbitmq;
pub mod registry;

pub use eventhubs::settings::{CheckpointStoreKind, EventHubs, EventHubsAuth, StartAt, connection_string_part};
pub use rabbitmq::settings::{Broker, QueueType, Topology};

use crate::metrics;
use crate::model::kind::ErrorKind;
use crate::status::Shared;
use serde_json::{Map, Value};
use std::any::Any;
use std::sync::Arc;
use std::sync::{Mutex, OnceLock};
use std::time::{Instant, SystemTime};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::task::task_tracker::TaskTrackerToken;

/// A source of device messages (quickwit's `Source`): what the service asks of it. A source
/// turns each delivery into its envelope and a [`DeliveryGuard`], hands both to the intake, and
/// acks, checkpoints or dead-letters each delivery when its guard reports back.
#[async_trait::async_trait(?Send)]
pub trait Source {
    /// `source.kind`.
    fn kind(&self) -> &'static str;
    /// What it reads (a queue, a hub's consumer group), for the log.
    fn reads(&self) -> String;
    /// The most deliveries it hands over unsettled at a time: what the shards' flush bound divides.
    fn in_flight_bound(&self) -> usize;
    /// Starts reading into `intake`; its connection state goes to `shared` (readiness, `/actors`).
    fn start(self: Box<Self>, intake: Arc<dyn Intake>, shared: Arc<Shared>) -> Box<dyn Running>;
    /// A confirming publisher to where it reads, keeping up to `in_flight` messages unconfirmed
    /// (`publish`, `simulate`).
    async fn publisher(&self, in_flight: usize) -> Result<Box<dyn Publish>, String>;
    /// Its dead letters, to list and move back (`dead-letters list|redrive`).
    async fn dead_letters(&self) -> Result<Box<dyn DeadLetters>, String>;
}

/// Sends messages where a source reads them, each confirmed by the broker.
#[async_trait::async_trait(?Send)]
pub trait Publish {
    /// Where it sends, for the user: `queue q`, `event hub h`.
    fn target(&self) -> String;
    /// Sends one message; `key` routes it (the device id: hash routing, partition key).
    async fn send(&mut self, body: &[u8], key: Option<&str>) -> Result<(), String>;
    /// Waits until everything sent is confirmed or refused.
    async fn flush(&mut self) -> Result<(), String>;
    /// Confirmed and refused so far.
    fn counts(&self) -> (u64, u64);
}

/// One dead letter: why it was dead-lettered, and the envelope it would be normalized from.
pub struct DeadLetter {
    /// `x-iomt-error-kind` (or the broker's own reason, such as `delivery-limit`).
    pub kind: String,
    pub error: String,
    pub envelope: Result<Value, String>,
    /// The source's own record of it (to move it back).
    pub record: Position,
}

/// A source's dead letters: taken one by one; each either moved back to where it came from or
/// left where it is when the reader closes.
#[async_trait::async_trait(?Send)]
pub trait DeadLetters {
    /// Where they are: the queue's or hub's name.
    fn name(&self) -> String;
    /// What that is, for the user: `dead-letter queue`, `dead-letter hub`.
    fn what(&self) -> &'static str {
        "dead-letter queue"
    }
    /// Where `move_back` sends them, for the user.
    fn back_to(&self) -> String;
    /// The next dead letter, `None` when there are no more.
    async fn take(&mut self) -> Result<Option<DeadLetter>, String>;
    /// Sends `d` back to where it was read from (without its dead-letter reason); it leaves the
    /// dead letters only once that send is confirmed.
    async fn move_back(&mut self, d: DeadLetter) -> Result<(), String>;
    /// Leaves what was taken and not moved back where it was.
    async fn close(self: Box<Self>);
}

/// A source that is reading.
#[async_trait::async_trait(?Send)]
pub trait Running {
    /// Stops taking new messages; those already handed over are still settled.
    async fn stop_taking(&mut self);
    /// Once the pipeline has settled what it was given: the last acks or checkpoints, then the
    /// connection closes.
    async fn close(self: Box<Self>);
}

/// Which source the messages come from (`source.kind`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// `[broker]`: a RabbitMQ queue (or shard queues).
    #[default]
    Rabbitmq,
    /// `[eventhubs]`: an Azure Event Hub, its partitions shared by the instances of one consumer group.
    Eventhubs,
}

// The registry: a new source is a folder under src/source/, a variant above, one line in each
// of the matches below and in `registry.rs`, and its settings section in `config::Settings`.
impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Rabbitmq => "rabbitmq",
            SourceKind::Eventhubs => "eventhubs",
        }
    }
}

impl SourceKind {
    /// Its own settings section's problems (only the configured source's section is checked).
    pub(crate) fn check(self, broker: &Broker, eventhubs: &EventHubs, p: &mut crate::problems::Problems) {
        match self {
            SourceKind::Rabbitmq => broker.check(p),
            SourceKind::Eventhubs => eventhubs.check(p),
        }
    }
}

pub use crate::model::kind::Failure;

/// What became of a delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Everything derived from it is written (or it held nothing to write).
    Persisted,
    /// It is to be dead-lettered, for this reason.
    DeadLettered(Failure),
}

/// Where a delivery stands in its source: the source's own record, opaque to everyone else.
pub struct Position(Box<dyn Any + Send + Sync>);

impl Position {
    pub fn new<T: Any + Send + Sync>(source_record: T) -> Position {
        Position(Box::new(source_record))
    }

    /// The source's record back, if it is of type `T`.
    pub fn into_inner<T: Any>(self) -> Option<T> {
        self.0.downcast::<T>().ok().map(|b| *b)
    }
}

/// A delivery, settled: back to its source.
pub struct Settled {
    pub position: Position,
    pub status: Status,
    /// When the device sent it (for the latency metric), if the message says.
    pub sent_at: Option<SystemTime>,
    pub received: Instant,
    /// The service's count of work in hand: held until the source has acked or returned the
    /// delivery (RabbitMQ), or booked it toward its next checkpoint (Event Hubs, whose close
    /// writes the last one), so that shutdown knows when the last one is done.
    pub work: Option<TaskTrackerToken>,
}

/// A delivery in flight. See the module comment; `Drop` is the only way out, so nothing derived
/// from a message can be forgotten without its source hearing of it.
pub struct DeliveryGuard {
    settled: Option<(Position, Option<SystemTime>, Instant)>,
    failure: Mutex<Option<Failure>>,
    to_source: UnboundedSender<Settled>,
    work: OnceLock<TaskTrackerToken>,
}

impl DeliveryGuard {
    pub fn new(position: Position, sent_at: Option<SystemTime>, to_source: UnboundedSender<Settled>) -> Self {
        let settled = Some((position, sent_at, Instant::now()));
        DeliveryGuard { settled, failure: Mutex::new(None), to_source, work: OnceLock::new() }
    }

    /// The pipeline took the delivery in hand: the service's work count holds it until its source
    /// is done with it (the intake calls this; the first token is kept).
    pub fn hold(&self, work: TaskTrackerToken) {
        let _ = self.work.set(work);
    }

    /// Records a failure; the first one is the reason given when the message is dead-lettered.
    pub fn fail(&self, kind: ErrorKind, message: impl Into<String>) {
        if let Ok(mut f) = self.failure.lock()
            && f.is_none()
        {
            *f = Some(Failure { kind, message: message.into() });
        }
    }
}

impl Drop for DeliveryGuard {
    fn drop(&mut self) {
        if let Some((position, sent_at, received)) = self.settled.take() {
            let mut failure = self.failure.lock().ok().and_then(|mut f| f.take());
            if failure.is_none() && std::thread::panicking() {
                // Dropped while unwinding: whatever held it did not finish. Never ack that.
                failure = Some(Failure {
                    kind: ErrorKind::Internal,
                    message: "processing was interrupted by an internal error".into(),
                });
            }
            let status = failure.map_or(Status::Persisted, Status::DeadLettered);
            // The source outlives every guard during a run; if it is gone the process is ending
            // and the broker redelivers what it did not hear about.
            let work = self.work.take();
            let _ = self.to_source.send(Settled { position, status, sent_at, received, work });
        }
    }
}

/// The evaluation envelope every source gives a template, as iomt-fhir builds it from the .NET
/// `EventData`: `{"Body", "Properties", "SystemProperties"}`. Built by moving the parts in:
/// `json!` would serialize each into a copy, for every message.
pub fn envelope(body: Value, properties: Map<String, Value>, system: Map<String, Value>) -> Value {
    Value::Object(Map::from_iter([
        ("Body".into(), body),
        ("Properties".into(), Value::Object(properties)),
        ("SystemProperties".into(), Value::Object(system)),
    ]))
}

/// A delivery's body as the envelope's `Body`: `null` when empty or blank (no error in the
/// reference: it matches nothing), else the parsed JSON; `Err` naming `what` (the message, the
/// event) when it is not JSON.
pub fn body_json(bytes: &[u8], what: &str) -> Result<Value, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(bytes).map_err(|e| format!("the {what} body is not valid JSON: {e}"))
}

/// Where a source hands its deliveries: the pipeline.
pub trait Intake: Send + Sync {
    /// One delivery: its evaluation envelope (`Err` with the reason when the body is not JSON)
    /// and its guard.
    fn accept(&self, envelope: Result<Value, String>, guard: std::sync::Arc<DeliveryGuard>);
    /// The bytes in flight a source may hold (`pipeline.max_in_flight_bytes`), and the largest
    /// message it may take (`pipeline.max_message_bytes`).
    fn budget(&self) -> &Arc<budget::Budget>;
}

/// The bookkeeping every source does when it has settled a delivery: acked (or not, when its
/// broker session is gone and the broker will redeliver), the end-to-end latency, the in-flight
/// count.
pub fn book_settled(sent_at: Option<SystemTime>, received: Instant, acked: bool) {
    let m = metrics::get();
    if acked {
        m.messages_acked.inc();
    }
    m.unacked.dec();
    let since = sent_at.and_then(|t| SystemTime::now().duration_since(t).ok()).unwrap_or_else(|| received.elapsed());
    m.latency.observe(since.as_secs_f64());
}

/// A delivery was taken from the broker (before the pipeline sees it).
pub fn book_received() {
    let m = metrics::get();
    m.messages_received.inc();
    m.unacked.inc();
}

/// A dead letter is out: counted, and logged without the message's content.
pub fn book_dead_lettered(kind: ErrorKind, message: &str) {
    metrics::get().dead_lettered.with_label_values(&[kind.as_str()]).inc();
    tracing::info!(%kind, "message dead-lettered");
    tracing::debug!(%kind, error = %message, "dead-letter reason");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_clone_reports_the_first_failure_with_the_sources_record() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let guard = std::sync::Arc::new(DeliveryGuard::new(Position::new(42u64), None, tx));
        let other = guard.clone();
        guard.fail(ErrorKind::MissingValue, "first");
        other.fail(ErrorKind::FhirRejected, "second");
        drop(guard);
        assert!(rx.try_recv().is_err(), "not settled while a clone lives");
        drop(other);
        let s = rx.try_recv().unwrap_or_else(|_| panic!("settled"));
        assert_eq!(s.status, Status::DeadLettered(Failure { kind: ErrorKind::MissingValue, message: "first".into() }));
        assert_eq!(s.position.into_inner::<u64>(), Some(42));
    }
}
