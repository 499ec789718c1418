//! What the running service shows of itself: the state the HTTP endpoints read (readiness inputs,
//! message counts) and each actor's stats. Written by the pipeline and the sources, read by `http`;
//! it knows neither.

use crate::fhir::circuit::Circuit;
use dashmap::DashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI8, AtomicI64, AtomicU64, Ordering};

/// What an actor reports at `/actors`.
pub struct ActorStats {
    pub name: String,
    pub kind: &'static str,
    mailbox: AtomicI64,
    handled: AtomicU64,
    devices: AtomicU64,
    last_flush_ms: AtomicI64,
}

impl ActorStats {
    pub fn new(name: String, kind: &'static str) -> Arc<ActorStats> {
        Arc::new(ActorStats {
            name,
            kind,
            mailbox: AtomicI64::new(0),
            handled: AtomicU64::new(0),
            devices: AtomicU64::new(0),
            last_flush_ms: AtomicI64::new(0),
        })
    }

    pub fn queued(&self) {
        self.mailbox.fetch_add(1, Ordering::Relaxed);
    }

    /// A message taken from the mailbox.
    pub fn received(&self) {
        self.mailbox.fetch_sub(1, Ordering::Relaxed);
        self.handled.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_devices(&self, n: usize) {
        self.devices.store(n as u64, Ordering::Relaxed);
    }

    pub fn flushed(&self) {
        self.last_flush_ms.store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let last = self.last_flush_ms.load(Ordering::Relaxed);
        serde_json::json!({
            "name": self.name,
            "kind": self.kind,
            "mailbox": self.mailbox.load(Ordering::Relaxed).max(0),
            "handled": self.handled.load(Ordering::Relaxed),
            "devices": self.devices.load(Ordering::Relaxed),
            "lastFlush": chrono::DateTime::from_timestamp_millis(last).filter(|_| last > 0).map(crate::model::time::millis),
        })
    }
}

/// What `/actors` and `/health/ready` show of a source (its `observable_state`): the source
/// keeps its own state and renders it.
pub trait SourceView: Send + Sync {
    /// `source.kind`.
    fn kind(&self) -> &'static str;
    /// `/actors`' `source` member: its kind and its queues, partitions or the like.
    fn snapshot(&self) -> serde_json::Value;
}

/// Snapshots sorted by one of their members, for stable output.
pub fn sorted_by(mut v: Vec<serde_json::Value>, member: &str) -> Vec<serde_json::Value> {
    v.sort_by(|a, b| a[member].as_str().cmp(&b[member].as_str()));
    v
}

/// State the HTTP endpoints read.
pub struct Shared {
    pub broker_connected: AtomicBool,
    pub fhir_reachable: AtomicBool,
    pub dry_run: bool,
    pub actors: DashMap<String, Arc<ActorStats>>,
    /// Open while the FHIR server fails transiently (never in dry-run).
    pub fhir_circuit: Arc<Circuit>,
    /// What the running source shows of itself (set when it starts).
    pub source: std::sync::OnceLock<Arc<dyn SourceView>>,
    /// The mappings in force, and why the last reload was refused (if it was).
    pub mappings_version: std::sync::Mutex<String>,
    pub mappings_refused: std::sync::Mutex<Option<String>>,
}

/// One consumed queue, as `/actors` shows it.
pub struct QueueState {
    pub name: Arc<str>,
    /// `primary` (this instance is meant to be its active consumer) or `standby`.
    pub role: &'static str,
    /// This queue's `iomt_queue_deliveries_total` (looked up once, not per message).
    deliveries: prometheus::IntCounter,
    last_delivery_ms: AtomicI64,
    /// 1 active, 0 standing by, -1 unknown (no broker.management_url to ask).
    active: AtomicI8,
}

impl QueueState {
    pub fn new(name: &str, role: &'static str) -> Arc<QueueState> {
        Arc::new(QueueState {
            name: name.into(),
            role,
            deliveries: crate::metrics::get().queue_deliveries.with_label_values(&[name]),
            last_delivery_ms: AtomicI64::new(0),
            active: AtomicI8::new(-1),
        })
    }

    pub fn delivered(&self) {
        self.deliveries.inc();
        self.last_delivery_ms.store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    pub fn set_active(&self, active: Option<bool>) {
        self.active.store(active.map_or(-1, i8::from), Ordering::Relaxed);
    }

    pub fn active(&self) -> Option<bool> {
        match self.active.load(Ordering::Relaxed) {
            -1 => None,
            a => Some(a == 1),
        }
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let last = self.last_delivery_ms.load(Ordering::Relaxed);
        serde_json::json!({
            "name": &*self.name,
            "role": self.role,
            "active": self.active(),
            "deliveries": self.deliveries.get(),
            "lastDelivery": chrono::DateTime::from_timestamp_millis(last).filter(|_| last > 0).map(crate::model::time::millis),
        })
    }
}

/// One owned event hub partition, as `/actors` shows it.
pub struct PartitionState {
    pub id: String,
    /// The ownership's version: the receiver's owner level (epoch).
    pub owner_level: i64,
    /// Sequence number of the checkpoint (-1: none yet) and of the last event enqueued (sampled).
    pub checkpoint: AtomicI64,
    pub last_enqueued: AtomicI64,
    since: chrono::DateTime<chrono::Utc>,
}

impl PartitionState {
    pub fn new(id: &str, owner_level: i64) -> Arc<PartitionState> {
        Arc::new(PartitionState {
            id: id.to_string(),
            owner_level,
            checkpoint: AtomicI64::new(-1),
            last_enqueued: AtomicI64::new(-1),
            since: chrono::Utc::now(),
        })
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let (cp, last) = (self.checkpoint.load(Ordering::Relaxed), self.last_enqueued.load(Ordering::Relaxed));
        serde_json::json!({
            "partition": self.id,
            "ownerLevel": self.owner_level,
            "ownedSince": crate::model::time::millis(self.since),
            "checkpointSequenceNumber": (cp >= 0).then_some(cp),
            "lastEnqueuedSequenceNumber": (last >= 0).then_some(last),
            "checkpointLag": (last >= 0).then_some((last - cp).max(0)),
        })
    }
}

impl Shared {
    pub fn new(dry_run: bool, fhir_circuit: Arc<Circuit>) -> Arc<Shared> {
        Arc::new(Shared {
            fhir_circuit,
            source: Default::default(),
            mappings_version: Default::default(),
            mappings_refused: Default::default(),
            broker_connected: AtomicBool::new(false),
            fhir_reachable: AtomicBool::new(dry_run),
            dry_run,
            actors: DashMap::new(),
        })
    }

    pub fn stats(&self, name: String, kind: &'static str) -> Arc<ActorStats> {
        let s = ActorStats::new(name.clone(), kind);
        self.actors.insert(name, s.clone());
        s
    }
}
