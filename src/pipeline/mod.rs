//! The stages: ingest → DeviceShard actors → FhirWriter actors (with the IdentityCache actor).
//! [`Pipeline::start`] builds them on a FHIR store and hands back the intake a source feeds; the
//! service (`crate::service`) composes it with the source, the HTTP endpoints and the shutdown.

pub mod identity;
pub mod ingest;
pub mod mappings;
pub mod shard;
#[cfg(test)]
mod testkit;
pub mod writer;

use crate::config::{IdentityMode, Settings};
use crate::fhir::FhirStore;
use crate::status::{ActorStats, Shared};
use actix::dev::ToEnvelope;
use actix::prelude::*;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::TaskTracker;

/// An actor's address that counts what waits in its mailbox.
pub struct Counted<A: Actor> {
    pub addr: Addr<A>,
    pub stats: Arc<ActorStats>,
}

impl<A: Actor> Clone for Counted<A> {
    fn clone(&self) -> Self {
        Counted { addr: self.addr.clone(), stats: self.stats.clone() }
    }
}

impl<A: Actor> Counted<A> {
    pub fn do_send<M>(&self, msg: M)
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
    {
        self.stats.queued();
        self.addr.do_send(msg)
    }

    pub fn send<M>(&self, msg: M) -> actix::dev::Request<A, M>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
    {
        self.stats.queued();
        self.addr.send(msg)
    }
}

fn device_hash(device_id: &str) -> u64 {
    // SipHash with fixed keys: the same device maps to the same shard in every instance and run.
    let mut h = std::hash::DefaultHasher::new();
    device_id.hash(&mut h);
    h.finish()
}

/// The shard that owns a device.
pub fn shard_for(device_id: &str, shards: usize) -> usize {
    (device_hash(device_id) % shards as u64) as usize
}

/// The writer that writes a device's Observations (other bits of the hash than the shard's, so
/// every writer gets work whatever the two counts).
pub fn writer_for(device_id: &str, writers: usize) -> usize {
    ((device_hash(device_id) >> 32) % writers as u64) as usize
}

/// The measurements a shard holds before it flushes. Messages are acked only after their flush, so
/// if the shards together could hold the source's whole in-flight window the source would stop
/// delivering until the interval timer fired: each shard flushes at a quarter of its share of the
/// window at most.
pub fn flush_bound(in_flight_bound: usize, s: &Settings) -> usize {
    let share = (in_flight_bound / (4 * s.pipeline.shards)).max(1);
    s.pipeline.flush_max_measurements.min(share)
}

/// The running stages.
pub struct Pipeline {
    /// Where a source hands its deliveries.
    pub intake: Arc<ingest::Ingest>,
    shards: Arc<Vec<Counted<shard::DeviceShard>>>,
    arbiters: Vec<Arbiter>,
}

impl Pipeline {
    /// Starts the identity cache, the writers and the shards on `store`, with the mappings in
    /// `current`. `in_flight_bound` is the most deliveries the source hands over unsettled;
    /// `identity` the identity mode (a dry run resolves as Create does); `work` counts every
    /// delivery the intake takes until its source is done with it.
    pub fn start(
        settings: &Settings,
        store: Arc<dyn FhirStore>,
        identity: IdentityMode,
        current: Arc<mappings::Current>,
        shared: &Shared,
        in_flight_bound: usize,
        work: TaskTracker,
    ) -> Pipeline {
        let istats = shared.stats("identity".into(), "IdentityCache");
        let ttl = Duration::from_secs(settings.identity.cache_ttl_secs);
        let miss_ttl = Duration::from_secs(settings.identity.miss_ttl_secs);
        let system = settings.device_system().map(str::to_string);
        let cache = identity::IdentityCache::new(store.clone(), identity, system, ttl, miss_ttl, istats.clone());
        let identity = Counted { addr: cache.start(), stats: istats };

        // Actors run on `pipeline.threads` arbiters (threads), round-robin; with 0 they share the
        // main thread with ingest. On a small machine that shares its cores with the broker, fewer
        // threads means fewer cross-thread wake-ups per message (see the README's performance notes).
        let arbiters: Vec<Arbiter> = (0..settings.pipeline.threads).map(|_| Arbiter::new()).collect();
        let place =
            |i: usize| arbiters.get(i % arbiters.len().max(1)).map(|a| a.handle()).unwrap_or_else(Arbiter::current);
        let give_up = Some(Duration::from_secs(settings.fhir.give_up_after_secs)).filter(|d| !d.is_zero());
        let mut writers = Vec::new();
        for i in 0..settings.pipeline.writers {
            let stats = shared.stats(format!("writer-{i}"), "FhirWriter");
            let (c, id, batch, s) = (store.clone(), identity.clone(), settings.fhir.batch, stats.clone());
            let addr = writer::FhirWriter::start_in_arbiter(&place(i), move |_| {
                writer::FhirWriter::new(c, id, batch, s, give_up)
            });
            writers.push(Counted { addr, stats });
        }
        let writers = Arc::new(writers);
        let (interval, max) =
            (Duration::from_millis(settings.pipeline.flush_interval_ms), flush_bound(in_flight_bound, settings));
        let mut shards = Vec::new();
        for i in 0..settings.pipeline.shards {
            let stats = shared.stats(format!("shard-{i}"), "DeviceShard");
            let (w, s) = (writers.clone(), stats.clone());
            let addr = shard::DeviceShard::start_in_arbiter(&place(i + settings.pipeline.writers), move |_| {
                shard::DeviceShard::new(w, interval, max, s)
            });
            shards.push(Counted { addr, stats });
        }
        let shards = Arc::new(shards);
        let budget = crate::source::budget::Budget::new(
            settings.pipeline.max_in_flight_bytes,
            settings.pipeline.max_message_bytes,
        );
        crate::metrics::get().in_flight_bytes_limit.set(i64::try_from(budget.limit()).unwrap_or(i64::MAX));
        let intake = Arc::new(ingest::Ingest::new(settings.unmatched(), current, shards.clone(), work, budget));
        Pipeline { intake, shards, arbiters }
    }

    /// Hands every shard's groups to the writers now (shutdown: nothing waits for its timer).
    pub async fn flush(&self) {
        for s in self.shards.iter() {
            let _ = s.send(shard::FlushNow).await;
        }
    }

    pub fn stop(self) {
        for a in self.arbiters {
            a.stop();
        }
    }
}
