//! Whether the FHIR server is taking work. A request that still fails transiently after the
//! client's own retries opens the circuit; the next answer that is not transient closes it. While
//! it is open the writers hold their groups (the broker keeps the messages unacked), readiness says
//! why, and everyone waiting is woken the moment it closes, so work resumes within a probe interval
//! of the server's return rather than at the end of a long backoff.

use crate::metrics;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

#[derive(Default)]
pub struct Circuit {
    open: Mutex<Option<Opened>>,
    closed: Notify,
}

struct Opened {
    since: Instant,
    since_utc: chrono::DateTime<chrono::Utc>,
    reason: String,
    /// Outage time already added to the outage counter.
    booked: Duration,
}

/// What readiness shows while the circuit is open.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenState {
    pub since: chrono::DateTime<chrono::Utc>,
    pub reason: String,
}

impl Circuit {
    /// The server failed transiently: open (or keep open, with the latest reason). The reason must
    /// not carry patient data: callers pass `FhirError::summary`.
    pub fn trip(&self, reason: String) {
        let Ok(mut open) = self.open.lock() else { return };
        match open.as_mut() {
            Some(o) => o.reason = reason,
            None => {
                tracing::warn!(%reason, "FHIR server unavailable: holding messages unacked until it answers again");
                metrics::get().fhir_circuit_open.set(1);
                *open = Some(Opened {
                    since: Instant::now(),
                    since_utc: chrono::Utc::now(),
                    reason,
                    booked: Duration::ZERO,
                });
            }
        }
    }

    /// The server answered: close, and wake everyone waiting.
    pub fn close(&self) {
        let Ok(mut open) = self.open.lock() else { return };
        if let Some(o) = open.take() {
            let outage = o.since.elapsed();
            metrics::get().fhir_outage_seconds.inc_by(outage.saturating_sub(o.booked).as_secs_f64());
            metrics::get().fhir_circuit_open.set(0);
            tracing::info!(outage_s = format!("{:.1}", outage.as_secs_f64()), "FHIR server answers again; resuming");
            self.closed.notify_waiters();
        }
    }

    pub fn state(&self) -> Option<OpenState> {
        let mut open = self.open.lock().ok()?;
        let o = open.as_mut()?;
        // Book the outage as it goes, so /metrics shows it growing during a long one.
        let elapsed = o.since.elapsed();
        metrics::get().fhir_outage_seconds.inc_by(elapsed.saturating_sub(o.booked).as_secs_f64());
        o.booked = elapsed;
        Some(OpenState { since: o.since_utc, reason: o.reason.clone() })
    }

    pub fn is_open(&self) -> bool {
        self.open.lock().map(|o| o.is_some()).unwrap_or(false)
    }

    /// Sleeps `delay`, or less if the circuit closes first.
    pub async fn wait(&self, delay: Duration) {
        let closed = self.closed.notified();
        tokio::pin!(closed);
        // Registered before the check, so a close in between is not missed.
        closed.as_mut().enable();
        if !self.is_open() {
            // Closed already (or never opened): still pause, the failure was real.
            tokio::time::sleep(delay.min(Duration::from_millis(200))).await;
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = closed => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn closing_wakes_a_waiter_long_before_its_delay() {
        let c = std::sync::Arc::new(Circuit::default());
        c.trip("HTTP 503".into());
        assert_eq!(c.state().map(|s| s.reason), Some("HTTP 503".to_string()));
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                c.wait(Duration::from_secs(3600)).await;
                t.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.close();
        let waited = tokio::time::timeout(Duration::from_secs(60), waiter).await;
        assert!(matches!(waited, Ok(Ok(d)) if d < Duration::from_secs(3600)));
        assert!(c.state().is_none());
    }
}
