//! The seam between the brokers and the pipeline.
//!
//! A source (RabbitMQ today) turns each broker delivery into its evaluation envelope and a
//! [`DeliveryGuard`], and hands both to the pipeline's [`Intake`]. The guard carries the delivery's
//! [`Position`], opaque to the pipeline; every measurement and group derived from the message holds
//! a clone. When the last clone drops, the guard sends its [`Status`] (persisted, or dead-lettered
//! with the first failure's typed kind and text) back to its source, which alone knows how to ack,
//! checkpoint or dead-letter on its broker. The pipeline never sees a broker type; a source never
//! sees an actor.

pub mod eventhubs;
pub mod ordered;
pub mod rabbitmq;

use crate::metrics;
use crate::model::kind::ErrorKind;
use crate::status::Shared;
use serde_json::{Map, Value};
use std::any::Any;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};
use tokio::sync::mpsc::UnboundedSender;

/// A running source, whichever it is.
pub enum Running {
    Rabbitmq(Box<rabbitmq::Running>),
    Eventhubs(eventhubs::Running),
}

/// Starts the configured source (`source.kind`), handing its deliveries to `intake`.
pub fn start(
    settings: &crate::config::Settings,
    intake: std::sync::Arc<dyn Intake>,
    shared: std::sync::Arc<Shared>,
) -> Running {
    let kind = settings.source.kind;
    let _ = shared.source_kind.set(kind.as_str());
    metrics::get().source_info.with_label_values(&[kind.as_str()]).set(1);
    match kind {
        crate::config::SourceKind::Rabbitmq => {
            Running::Rabbitmq(Box::new(rabbitmq::start(settings.broker.clone(), intake, shared)))
        }
        crate::config::SourceKind::Eventhubs => {
            Running::Eventhubs(eventhubs::start(settings.eventhubs.clone(), intake, shared))
        }
    }
}

impl Running {
    /// Stops taking new messages; those already handed over are still settled.
    pub async fn stop_taking(&mut self) {
        match self {
            Running::Rabbitmq(r) => r.stop_taking().await,
            Running::Eventhubs(r) => r.stop_taking().await,
        }
    }

    /// Once the pipeline has settled what it was given: the last acks or checkpoints, then the
    /// connection closes.
    pub async fn close(self) {
        match self {
            Running::Rabbitmq(r) => (*r).close(),
            Running::Eventhubs(r) => r.close().await,
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
}

/// A delivery in flight. See the module comment; `Drop` is the only way out, so nothing derived
/// from a message can be forgotten without its source hearing of it.
pub struct DeliveryGuard {
    settled: Option<(Position, Option<SystemTime>, Instant)>,
    failure: Mutex<Option<Failure>>,
    to_source: UnboundedSender<Settled>,
}

impl DeliveryGuard {
    pub fn new(position: Position, sent_at: Option<SystemTime>, to_source: UnboundedSender<Settled>) -> Self {
        DeliveryGuard { settled: Some((position, sent_at, Instant::now())), failure: Mutex::new(None), to_source }
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
            let _ = self.to_source.send(Settled { position, status, sent_at, received });
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
}

/// The bookkeeping every source does when it has settled a delivery: acked (or not, when its
/// broker session is gone and the broker will redeliver), the end-to-end latency, the in-flight
/// count.
pub fn book_settled(sent_at: Option<SystemTime>, received: Instant, acked: bool, shared: &Shared) {
    let m = metrics::get();
    if acked {
        m.messages_acked.inc();
    }
    m.unacked.dec();
    let since = sent_at.and_then(|t| SystemTime::now().duration_since(t).ok()).unwrap_or_else(|| received.elapsed());
    m.latency.observe(since.as_secs_f64());
    shared.settled.fetch_add(1, Ordering::SeqCst);
}

/// A dead letter is out: counted, and logged without the message's content.
pub fn book_dead_lettered(kind: ErrorKind, message: &str, shared: &Shared) {
    metrics::get().dead_lettered.with_label_values(&[kind.as_str()]).inc();
    shared.dead_lettered.fetch_add(1, Ordering::SeqCst);
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
