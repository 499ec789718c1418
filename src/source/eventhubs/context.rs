//! What the coordinator and its partition readers share: the phase of a stop, the connection and
//! checkpoint store, and the partitions owned.

use super::settings::EventHubs;
use super::store::CheckpointStore;
use crate::source::Intake;
use crate::status::PartitionState;
use azure_messaging_eventhubs::{ConsumerClient, ProducerClient};
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd)]
pub(super) enum Phase {
    Running,
    /// No new events; what was handed over is still settled and checkpointed.
    StopTaking,
    /// Write the last checkpoints, give the partitions up, end.
    Close,
}

/// The partitions this instance owns, by id.
#[derive(Default)]
pub(super) struct Partitions(pub(super) dashmap::DashMap<String, Arc<PartitionState>>);

impl crate::status::SourceView for Partitions {
    fn kind(&self) -> &'static str {
        "eventhubs"
    }

    fn snapshot(&self) -> serde_json::Value {
        let partitions = self.0.iter().map(|p| p.value().snapshot()).collect();
        serde_json::json!({"kind": "eventhubs", "partitions": crate::status::sorted_by(partitions, "partition")})
    }
}

/// Everything a partition reader needs, shared.
pub(super) struct Ctx {
    pub(super) s: EventHubs,
    pub(super) hub: String,
    pub(super) me: String,
    pub(super) consumer: ConsumerClient,
    pub(super) dead_letters: ProducerClient,
    pub(super) store: Box<dyn CheckpointStore>,
    pub(super) intake: Arc<dyn Intake>,
    /// The partitions this instance owns, as `/actors` shows them.
    pub(super) partitions: Arc<Partitions>,
    /// Per partition, held by a reader from opening its receiver to closing it. The SDK closes
    /// a receiver by the partition's address, so a reader of a lost partition that closes late
    /// (held up settling) would otherwise detach the receiver of the reader that claimed the
    /// partition back.
    pub(super) links: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Ctx {
    pub(super) fn link_lock(&self, partition: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut links = self.links.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        links.entry(partition.to_string()).or_default().clone()
    }
}
