//! A broker delivery in flight. Every measurement and group derived from a message holds a clone of
//! its `DeliveryGuard`; when the last clone drops (everything persisted, or failed), the guard sends
//! the delivery to be settled: acked, or dead-lettered with the first failure's reason and then
//! acked. Nothing derived from a message can be lost without its guard noticing.

use lapin::Acker;
use lapin::BasicProperties;
use std::sync::Mutex;
use std::time::{Instant, SystemTime};
use tokio::sync::mpsc::UnboundedSender;

/// Why a message was not (wholly) persisted.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// A stable kind for metrics and the `x-iomt-error-kind` header.
    pub kind: &'static str,
    /// Human text naming what to fix (template, expression, HTTP status...).
    pub message: String,
}

/// What the settler needs to ack or dead-letter one delivery.
pub struct Settle {
    pub acker: Option<Acker>,
    /// The delivery tag and the broker session (channel) it belongs to: acks go out in tag order.
    pub tag: u64,
    pub session: u64,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    pub routing_key: String,
    pub failure: Option<Failure>,
    /// When the device sent it (header `x-iomt-sent-at`, AMQP timestamp), for the latency metric.
    pub sent_at: Option<SystemTime>,
    pub received: Instant,
}

pub struct DeliveryGuard {
    settle: Option<Settle>,
    failure: Mutex<Option<Failure>>,
    to_settler: UnboundedSender<Settle>,
}

impl DeliveryGuard {
    pub fn new(settle: Settle, to_settler: UnboundedSender<Settle>) -> DeliveryGuard {
        DeliveryGuard { settle: Some(settle), failure: Mutex::new(None), to_settler }
    }

    /// Records a failure; the first one is the reason given when the message is dead-lettered.
    pub fn fail(&self, kind: &'static str, message: impl Into<String>) {
        if let Ok(mut f) = self.failure.lock()
            && f.is_none()
        {
            *f = Some(Failure { kind, message: message.into() });
        }
    }

    pub fn failed(&self) -> bool {
        self.failure.lock().map(|f| f.is_some()).unwrap_or(true)
    }
}

impl Drop for DeliveryGuard {
    fn drop(&mut self) {
        if let Some(mut s) = self.settle.take() {
            s.failure = self.failure.lock().ok().and_then(|mut f| f.take());
            if s.failure.is_none() && std::thread::panicking() {
                // Dropped while unwinding: whatever held it did not finish. Never ack that.
                s.failure = Some(Failure {
                    kind: "internal",
                    message: "processing was interrupted by an internal error".into(),
                });
            }
            // The settler outlives every guard during a run; if it is gone the process is ending
            // and the broker redelivers the unacked message.
            let _ = self.to_settler.send(s);
        }
    }
}
