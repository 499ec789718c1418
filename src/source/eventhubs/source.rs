//! `source.kind = "eventhubs"`: what the service asks of the Event Hubs source.

use crate::config::EventHubs;
use crate::source::{Intake, Source};
use crate::status::Shared;
use std::sync::Arc;

/// The `[eventhubs]` section's hub and consumer group.
pub struct EventHubsSource(pub EventHubs);

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
}

#[async_trait::async_trait(?Send)]
impl crate::source::Running for super::Running {
    async fn stop_taking(&mut self) {
        super::Running::stop_taking(self).await
    }

    async fn close(self: Box<Self>) {
        super::Running::close(*self).await
    }
}
