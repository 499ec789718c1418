//! The DeviceShard actor: buffers the measurements of the devices that hash to it, per group
//! (device, type, patient, encounter, correlation id, window), and hands the groups to the writers
//! every `flush_interval_ms` or as soon as it holds `flush_max_measurements`.

use super::mappings::Mappings;
use super::writer::{FhirWriter, PendingGroup, WriteBatch};
use super::{Counted, writer_for};
use crate::engine::Grouper;
use crate::metrics;
use crate::model::measurement::Measurement;
use crate::source::DeliveryGuard;
use crate::status::ActorStats;
use actix::prelude::*;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// Measurements of one message that hash to this shard.
pub struct Ingest {
    pub measurements: Vec<Measurement>,
    pub guard: Arc<DeliveryGuard>,
    /// The mappings the message was normalized with; its groups are built with them too.
    pub mappings: Arc<Mappings>,
}

impl Message for Ingest {
    type Result = ();
}

/// Flush everything now (shutdown); answers once the groups are handed to the writers.
pub struct FlushNow;

impl Message for FlushNow {
    type Result = ();
}

/// What a group carries through the shard: the messages it came from, and the mappings of its
/// first message (it is written with them).
struct Carried {
    guards: Vec<Arc<DeliveryGuard>>,
    mappings: Arc<Mappings>,
}

pub struct DeviceShard {
    writers: Arc<Vec<Counted<FhirWriter>>>,
    flush_interval: Duration,
    flush_max: usize,
    groups: Grouper<Carried>,
    devices: HashSet<String>,
    buffered: usize,
    stats: Arc<ActorStats>,
}

impl DeviceShard {
    pub fn new(
        writers: Arc<Vec<Counted<FhirWriter>>>,
        flush_interval: Duration,
        flush_max: usize,
        stats: Arc<ActorStats>,
    ) -> Self {
        DeviceShard {
            writers,
            flush_interval,
            flush_max,
            groups: Grouper::default(),
            devices: HashSet::new(),
            buffered: 0,
            stats,
        }
    }

    fn add(&mut self, m: Measurement, guard: &Arc<DeliveryGuard>, mappings: &Arc<Mappings>) {
        if !self.devices.contains(&m.device_id) {
            self.devices.insert(m.device_id.clone());
        }
        let new = || Carried { guards: Vec::new(), mappings: mappings.clone() };
        match self.groups.add_with(&mappings.fhir, m, new) {
            Ok(carried) => {
                // Measurements of one message arrive together: checking the last guard is enough
                // to keep one clone per message and group.
                if !carried.guards.last().is_some_and(|g| Arc::ptr_eq(g, guard)) {
                    carried.guards.push(guard.clone());
                }
                self.buffered += 1;
            }
            Err(e) => guard.fail(e.kind(), e.to_string()),
        }
    }

    fn flush(&mut self) {
        if self.groups.is_empty() {
            return;
        }
        let groups = self.groups.take();
        self.devices.clear();
        self.buffered = 0;
        metrics::get().groups.inc_by(groups.len() as u64);
        let mut per_writer: Vec<Vec<PendingGroup>> = (0..self.writers.len()).map(|_| Vec::new()).collect();
        for (group, Carried { guards, mappings }) in groups {
            per_writer[writer_for(&group.key.device_id, self.writers.len())]
                .push(PendingGroup::new(group, guards, mappings));
        }
        for (w, batch) in self.writers.iter().zip(per_writer) {
            if !batch.is_empty() {
                w.do_send(WriteBatch { groups: batch });
            }
        }
        self.stats.flushed();
        self.stats.set_devices(0);
    }
}

impl Actor for DeviceShard {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.flush_interval, |act, _| act.flush());
    }
}

impl Handler<Ingest> for DeviceShard {
    type Result = ();

    fn handle(&mut self, msg: Ingest, _: &mut Context<Self>) {
        self.stats.received();
        for m in msg.measurements {
            self.add(m, &msg.guard, &msg.mappings);
        }
        self.stats.set_devices(self.devices.len());
        if self.buffered >= self.flush_max {
            self.flush();
        }
    }
}

impl Handler<FlushNow> for DeviceShard {
    type Result = ();

    fn handle(&mut self, _: FlushNow, _: &mut Context<Self>) {
        self.stats.received();
        self.flush();
    }
}
