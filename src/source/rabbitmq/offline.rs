//! The RabbitMQ source behind the seam's offline parts: its confirming publisher (`publish`,
//! `simulate`) and its dead-letter queue (`dead-letters list|redrive`).

use super::{Broker, DeadLetterQueue, Publisher, Rabbitmq};
use crate::problems::redact;
use crate::source::{DeadLetter, DeadLetters, Position, Publish};

pub(super) async fn publisher(b: &Broker, in_flight: usize) -> Result<Box<dyn Publish>, String> {
    let p = Publisher::connect(b, in_flight).await.map_err(|e| format!("broker {}: {e}", redact(&b.url)))?;
    Ok(Box::new(Sending(p, b.queue.clone(), redact(&b.url))))
}

pub(super) async fn dead_letters(b: &Broker) -> Result<Box<dyn DeadLetters>, String> {
    let q = DeadLetterQueue::open(b).await.map_err(|e| broker_error(b, e))?;
    Ok(Box::new(Letters { q, broker: b.clone() }))
}

fn broker_error(b: &Broker, e: impl std::fmt::Display) -> String {
    format!("broker {} (queue {}): {e}", redact(&b.url), b.dead_letter_queue)
}

/// The publisher, its queue, and the broker's address without its password (for errors).
struct Sending(Publisher, String, String);

#[async_trait::async_trait(?Send)]
impl Publish for Sending {
    fn target(&self) -> String {
        self.1.clone()
    }

    async fn send(&mut self, body: &[u8], key: Option<&str>) -> Result<(), String> {
        self.0.send(body, key).await.map_err(|e| format!("broker {}: {e}", self.2))
    }

    async fn flush(&mut self) -> Result<(), String> {
        self.0.flush().await.map_err(|e| format!("broker {}: {e}", self.2))
    }

    fn counts(&self) -> (u64, u64) {
        (self.0.confirmed, self.0.refused)
    }
}

struct Letters {
    q: DeadLetterQueue,
    broker: Broker,
}

#[async_trait::async_trait(?Send)]
impl DeadLetters for Letters {
    fn name(&self) -> String {
        self.q.queue.clone()
    }

    fn back_to(&self) -> String {
        format!("their queue (default {})", self.broker.queue)
    }

    async fn take(&mut self) -> Result<Option<DeadLetter>, String> {
        let Some(d) = self.q.take().await.map_err(|e| broker_error(&self.broker, e))? else { return Ok(None) };
        let (kind, error, envelope) = (d.kind.clone(), d.error.clone(), d.envelope(&self.broker));
        Ok(Some(DeadLetter { kind, error, envelope, record: Position::new(d) }))
    }

    /// Back to the queue it came from (`broker.queue` when the message does not say).
    async fn move_back(&mut self, d: DeadLetter) -> Result<(), String> {
        let Some(d) = d.record.into_inner::<super::DeadLetter>() else {
            return Err("not a dead letter of this queue".into());
        };
        self.q.move_back(&d, &self.broker.queue).await
    }

    async fn close(self: Box<Self>) {
        self.q.close().await;
    }
}

impl Rabbitmq {
    pub(super) fn broker(&self) -> &Broker {
        &self.0
    }
}
