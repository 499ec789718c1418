//! `source.kind = "eventhubs"`: what the service asks of the Event Hubs source.

use super::settings::EventHubs;
use crate::source::{DeadLetters, Intake, Publish, Source};
use crate::status::Shared;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The `[eventhubs]` section's hub and consumer group.
pub struct EventHubsSource(pub EventHubs);

#[async_trait::async_trait(?Send)]
impl Source for EventHubsSource {
    fn kind(&self) -> &'static str {
        "eventhubs"
    }

    fn reads(&self) -> String {
        format!("{}/ConsumerGroups/{}", self.0.hub_name(), self.0.consumer_group)
    }

    /// Per partition: the shards must flush before one partition's window fills.
    fn in_flight_bound(&self) -> usize {
        self.0.max_in_flight
    }

    fn start(self: Box<Self>, intake: Arc<dyn Intake>, shared: Arc<Shared>) -> Box<dyn crate::source::Running> {
        Box::new(super::start(self.0, intake, shared))
    }

    async fn publisher(&self, in_flight: usize) -> Result<Box<dyn Publish>, String> {
        let hub = self.0.hub_name();
        let p = super::HubPublisher::connect(&self.0, &hub, in_flight).await.map_err(|e| e.to_string())?;
        Ok(Box::new(Sending { p, hub, last: Instant::now() }))
    }

    /// The dead-letter hub up to its last event, less what was already redriven (recorded in the
    /// checkpoint store: events cannot be taken out of a hub).
    async fn dead_letters(&self) -> Result<Box<dyn DeadLetters>, String> {
        super::deadletters::open(&self.0).await
    }
}

/// A batching hub publisher behind the seam.
struct Sending {
    p: super::HubPublisher,
    hub: String,
    last: Instant,
}

#[async_trait::async_trait(?Send)]
impl Publish for Sending {
    fn target(&self) -> String {
        format!("event hub {}", self.hub)
    }

    async fn send(&mut self, body: &[u8], key: Option<&str>) -> Result<(), String> {
        self.p.send(body, key).await.map_err(|e| e.to_string())?;
        // Batches, but no reading waits more than 100 ms for its batch to fill.
        if self.last.elapsed() >= Duration::from_millis(100) {
            self.last = Instant::now();
            self.p.flush().await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), String> {
        self.p.flush().await.map_err(|e| e.to_string())
    }

    fn counts(&self) -> (u64, u64) {
        (self.p.confirmed, self.p.refused)
    }
}
