//! Intake: each delivery a source hands over is normalized and its measurements routed to the
//! shard of their device. Knows nothing of the broker: the delivery's guard reports back to its
//! source.

use super::mappings::{Current, Mappings};
use super::shard::{DeviceShard, Ingest as ShardIngest};
use super::{Counted, shard_for};
use crate::config::Unmatched;
use crate::engine;
use crate::metrics;
use crate::model::kind::ErrorKind;
use crate::model::measurement::Measurement;
use crate::source::budget::Budget;
use crate::source::{DeliveryGuard, Intake};
use serde_json::Value;
use std::sync::Arc;
use tokio_util::task::TaskTracker;

pub struct Ingest {
    unmatched: Unmatched,
    /// The service's work in hand: each delivery taken holds a token until its source is done.
    work: TaskTracker,
    mappings: Arc<Current>,
    shards: Arc<Vec<Counted<DeviceShard>>>,
    budget: Arc<Budget>,
}

impl Ingest {
    pub fn new(
        unmatched: Unmatched,
        mappings: Arc<Current>,
        shards: Arc<Vec<Counted<DeviceShard>>>,
        work: TaskTracker,
        budget: Arc<Budget>,
    ) -> Self {
        Ingest { unmatched, work, mappings, shards, budget }
    }

    fn route(&self, mut measurements: Vec<Measurement>, guard: &Arc<DeliveryGuard>, mappings: &Arc<Mappings>) {
        let now = chrono::Utc::now();
        for ms in &mut measurements {
            ms.ingestion_time = Some(now);
        }
        let n = self.shards.len();
        if n == 1 {
            self.shards[0].do_send(ShardIngest { measurements, guard: guard.clone(), mappings: mappings.clone() });
            return;
        }
        let mut per_shard: Vec<Vec<Measurement>> = (0..n).map(|_| Vec::new()).collect();
        for ms in measurements {
            per_shard[shard_for(&ms.device_id, n)].push(ms);
        }
        for (shard, ms) in self.shards.iter().zip(per_shard) {
            if !ms.is_empty() {
                shard.do_send(ShardIngest { measurements: ms, guard: guard.clone(), mappings: mappings.clone() });
            }
        }
    }
}

impl Intake for Ingest {
    fn accept(&self, event: Result<Value, String>, guard: Arc<DeliveryGuard>) {
        guard.hold(self.work.token());
        // The pair in force now is the one this message is normalized, grouped and written with.
        let mappings = self.mappings.get();
        let measurements = match engine::admit(&mappings.device, event) {
            Ok(ms) => ms,
            Err(f) if f.kind == ErrorKind::NoTemplateMatched && self.unmatched == Unmatched::Drop => {
                metrics::get().messages_dropped.with_label_values(&["no-match"]).inc();
                return;
            }
            Err(f) => return guard.fail(f.kind, f.message),
        };
        metrics::get().measurements.inc_by(measurements.len() as u64);
        self.route(measurements, &guard, &mappings);
    }

    fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }
}
