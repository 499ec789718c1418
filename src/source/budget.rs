//! The bytes of messages in flight (taken from a source and not yet settled), bounded by
//! `pipeline.max_in_flight_bytes`. A broker's window counts messages (RabbitMQ's prefetch, an
//! Event Hubs partition's batch), so large messages could fill memory while the FHIR server is
//! away: each source takes a [`Lease`] for every delivery it holds and stops taking deliveries
//! while the budget is spent, until settling has given back a quarter of it. A message larger than
//! `pipeline.max_message_bytes` is dead-lettered (`message-too-large`) before it is parsed.

use crate::metrics;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use tokio::sync::Notify;

pub struct Budget {
    limit: usize,
    max_message: usize,
    used: AtomicUsize,
    /// The largest recent message (0: none seen), which windows are sized by: a larger one raises
    /// it at once, and it decays by 1/32 with each message, so a few large messages among many small
    /// ones shrink the window for a while rather than for good.
    high: AtomicU64,
    freed: Notify,
}

impl Budget {
    pub fn new(limit: usize, max_message: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit: limit.max(1),
            max_message: max_message.max(1),
            used: AtomicUsize::new(0),
            high: AtomicU64::new(0),
            freed: Notify::new(),
        })
    }

    /// No bound: the dry run, tools and tests that do not measure memory.
    pub fn unbounded() -> Arc<Budget> {
        Budget::new(usize::MAX, usize::MAX)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Why a message of `bytes` is refused, naming the setting to change.
    pub fn too_large(&self, bytes: usize) -> Option<String> {
        (bytes > self.max_message).then(|| {
            format!(
                "the message is {bytes} bytes, more than pipeline.max_message_bytes ({}); it was not parsed",
                self.max_message
            )
        })
    }

    /// Takes a delivery of `bytes`: its lease, counted even when it is too large (it is in memory
    /// until it is dead-lettered), and why it is too large, if it is.
    pub fn take(self: &Arc<Self>, bytes: usize) -> (Lease, Option<String>) {
        (self.lease(bytes), self.too_large(bytes))
    }

    /// Counts `bytes` in flight until the lease drops (the delivery is settled).
    pub fn lease(self: &Arc<Self>, bytes: usize) -> Lease {
        let used = self.used.fetch_add(bytes, Ordering::SeqCst) + bytes;
        let _ = self
            .high
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| Some((h - h / 32).max(bytes as u64).max(1)));
        metrics::get().in_flight_bytes.set(used as i64);
        Lease { budget: self.clone(), bytes }
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }

    /// The budget is spent: take no more deliveries.
    pub fn spent(&self) -> bool {
        self.used() >= self.limit
    }

    /// Waits until settling has brought the bytes in flight to three quarters of the budget, so a
    /// paused source resumes with room for more than one message.
    pub async fn room(&self) {
        let low = self.limit / 4 * 3;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.used() <= low {
                return;
            }
            freed.await;
        }
    }

    /// Whether any message was seen yet (the window is sized by their average).
    pub fn seen_any(&self) -> bool {
        self.high.load(Ordering::Relaxed) != 0
    }

    /// Before any message was seen: as many of the largest messages allowed as the budget holds.
    pub fn cautious(&self, configured: u16) -> u16 {
        if self.limit == usize::MAX {
            return configured;
        }
        let fits = (self.limit / self.max_message).clamp(1, usize::from(u16::MAX)) as u16;
        fits.min(configured)
    }

    /// The most deliveries worth asking a broker for at once: `configured`, or fewer when that
    /// many messages as large as the largest recent one would overspend the budget.
    pub fn window(&self, configured: u16) -> u16 {
        let high = self.high.load(Ordering::Relaxed);
        if high == 0 || self.limit == usize::MAX {
            return configured;
        }
        let fits = (self.limit as u64 / high).clamp(1, u64::from(u16::MAX)) as u16;
        fits.min(configured)
    }
}

/// Bytes counted in flight; given back when dropped.
pub struct Lease {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let used = self.budget.used.fetch_sub(self.bytes, Ordering::SeqCst) - self.bytes;
        metrics::get().in_flight_bytes.set(used as i64);
        self.budget.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_message_over_the_maximum_is_refused_naming_the_setting() {
        let b = Budget::new(100, 10);
        assert_eq!(b.too_large(10), None);
        let why = b.too_large(11).unwrap_or_default();
        assert!(why.contains("pipeline.max_message_bytes (10)") && why.contains("11 bytes"), "{why}");
    }

    #[tokio::test]
    async fn a_spent_budget_has_room_again_once_a_quarter_is_given_back() {
        let b = Budget::new(100, 100);
        let first = b.lease(60);
        let second = b.lease(40);
        assert!(b.spent());
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.room().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "no room while all of it is in flight");
        drop(second);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap_or_else(|_| panic!("room once 40 of 100 came back"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!b.spent());
        drop(first);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn the_window_fits_the_budget_at_the_largest_recent_size() {
        let b = Budget::new(64 << 20, 16 << 20);
        assert_eq!(b.window(10_000), 10_000, "nothing seen yet");
        assert_eq!(b.cautious(10_000), 4, "before any: 64 MiB of 16 MiB messages");
        drop(b.lease(1 << 20));
        drop(b.lease(5 << 20));
        drop(b.lease(1 << 20));
        assert_eq!(b.window(10_000), 13, "64 MiB of messages as large as the 5 MiB one");
        for _ in 0..2_000 {
            drop(b.lease(200));
        }
        assert_eq!(b.window(10_000), 10_000, "after many small messages: the configured window");
        assert_eq!(b.used(), 0);
    }
}
