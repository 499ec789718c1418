//! The running service: ingest → DeviceShard actors → FhirWriter actors (with the IdentityCache
//! actor) → ack or dead-letter. This file wires them, supervises the run, and shuts it down.

pub mod identity;
pub mod ingest;
pub mod mappings;
pub mod shard;
#[cfg(test)]
mod testkit;
pub mod writer;

use crate::config::Settings;
use crate::fhir::{DryRun, FhirClient, FhirStore};
use crate::metrics;
use crate::status::{ActorStats, Shared};
use actix::dev::ToEnvelope;
use actix::prelude::*;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

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

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{path}: the {what} mapping is invalid:\n{problems}")]
    Mapping { path: String, what: &'static str, problems: String },
    #[error("{0}")]
    Fhir(#[from] crate::fhir::FhirError),
    #[error("cannot listen on {addr} (http.listen): {message}")]
    Http { addr: String, message: String },
    #[error("{0}")]
    Io(String),
}

/// The measurements a shard holds before it flushes. Messages are acked only after their flush, so
/// if the shards together could hold the whole prefetch window the broker would stop sending until
/// the interval timer fired: each shard flushes at a quarter of its share of the window at most.
pub fn flush_bound(s: &Settings) -> usize {
    let share = (s.broker.prefetch as usize / (4 * s.pipeline.shards)).max(1);
    s.pipeline.flush_max_measurements.min(share)
}

/// Runs the service until SIGTERM or SIGINT, then stops consuming, flushes every shard, waits for
/// the writes and the acks, and returns.
pub fn run(settings: Settings, dry_run: bool) -> Result<(), RunError> {
    let mappings = mappings::load(&settings)?;
    let system = actix_rt::System::new();
    let result = system.block_on(serve(Arc::new(settings), mappings, dry_run));
    System::current().stop();
    result
}

async fn serve(settings: Arc<Settings>, mappings: mappings::Mappings, dry_run: bool) -> Result<(), RunError> {
    let client = if dry_run { None } else { Some(FhirClient::new(&settings.fhir)?) };
    let store: Arc<dyn FhirStore> = match &client {
        Some(c) => Arc::new(c.clone()),
        None => Arc::new(DryRun::default()),
    };
    let shared = Shared::new(dry_run, store.circuit().clone());
    mappings::announce(&mappings, &shared);
    let current = mappings::Current::new(mappings);
    shared.mappings_loaded.store(true, Ordering::SeqCst);
    // Bound before any actor starts: a port in use ends the start with its message, and nothing
    // half-started is left to fail on its own.
    let debugger = settings.http.debugger.then(|| crate::studio::Studio {
        device: settings.mappings.device.clone(),
        fhir: settings.mappings.fhir.clone(),
        messages: settings.mappings.device.parent().map(|d| d.join("messages")).unwrap_or_default(),
        token: settings.http.debugger_token.clone(),
    });
    let server = crate::http::server(&settings.http.listen, shared.clone(), debugger)
        .map_err(|e| RunError::Http { addr: settings.http.listen.clone(), message: e.to_string() })?;
    let server_handle = server.handle();
    actix_rt::spawn(server);

    let istats = shared.stats("identity".into(), "IdentityCache");
    let identity = Counted {
        addr: identity::IdentityCache::new(
            store.clone(),
            // A dry run has no server to look up in: its ids are the ones Create makes.
            if dry_run { crate::config::IdentityMode::Create } else { settings.identity.mode },
            settings.device_system().map(str::to_string),
            Duration::from_secs(settings.identity.cache_ttl_secs),
            Duration::from_secs(settings.identity.miss_ttl_secs),
            istats.clone(),
        )
        .start(),
        stats: istats,
    };

    // Actors run on `pipeline.threads` arbiters (threads), round-robin; with 0 they share the main
    // thread with ingest. On a small machine that shares its cores with the broker, fewer threads
    // means fewer cross-thread wake-ups per message (see the README's performance notes).
    let arbiters: Vec<Arbiter> = (0..settings.pipeline.threads).map(|_| Arbiter::new()).collect();
    let place = |i: usize| arbiters.get(i % arbiters.len().max(1)).map(|a| a.handle()).unwrap_or_else(Arbiter::current);
    let mut writers = Vec::new();
    for i in 0..settings.pipeline.writers {
        let stats = shared.stats(format!("writer-{i}"), "FhirWriter");
        let (c, id, batch, s) = (store.clone(), identity.clone(), settings.fhir.batch, stats.clone());
        let give_up = Some(Duration::from_secs(settings.fhir.give_up_after_secs)).filter(|d| !d.is_zero());
        let addr =
            writer::FhirWriter::start_in_arbiter(&place(i), move |_| writer::FhirWriter::new(c, id, batch, s, give_up));
        writers.push(Counted { addr, stats });
    }
    let writers = Arc::new(writers);
    let mut shards = Vec::new();
    for i in 0..settings.pipeline.shards {
        let stats = shared.stats(format!("shard-{i}"), "DeviceShard");
        let (w, s) = (writers.clone(), stats.clone());
        let (interval, max) = (Duration::from_millis(settings.pipeline.flush_interval_ms), flush_bound(&settings));
        let addr = shard::DeviceShard::start_in_arbiter(&place(i + settings.pipeline.writers), move |_| {
            shard::DeviceShard::new(w, interval, max, s)
        });
        shards.push(Counted { addr, stats });
    }
    let shards = Arc::new(shards);

    if let Some(c) = client.clone() {
        let shared = shared.clone();
        actix_rt::spawn(async move {
            loop {
                let ok = c.ping().await.is_ok();
                if shared.fhir_reachable.swap(ok, Ordering::SeqCst) != ok {
                    tracing::info!(reachable = ok, url = c.base_url(), "FHIR server reachability changed");
                }
                // While writes are held, probe every second: the held work resumes as soon as a
                // probe answers (the circuit closes), not at the end of the writers' backoff.
                // Books the outage time as it goes (iomt_fhir_outage_seconds_total).
                let calm = ok && c.circuit().state().is_none();
                tokio::time::sleep(Duration::from_secs(if calm { 10 } else { 1 })).await;
            }
        });
    }

    actix_rt::spawn(mappings::watch(settings.clone(), current.clone(), shared.clone()));
    let intake = Arc::new(ingest::Ingest::new(settings.broker.unmatched, current, shards.clone()));
    let mut source = crate::source::start(&settings, intake, shared.clone());
    let reads = match settings.source.kind {
        crate::config::SourceKind::Rabbitmq => settings.broker.queue.clone(),
        crate::config::SourceKind::Eventhubs => {
            format!("{}/ConsumerGroups/{}", settings.eventhubs.hub_name(), settings.eventhubs.consumer_group)
        }
    };
    tracing::info!(
        source = settings.source.kind.as_str(),
        reads = %reads,
        shards = settings.pipeline.shards,
        writers = settings.pipeline.writers,
        fhir = %settings.fhir.base_url,
        dry_run,
        http = %settings.http.listen,
        "iomt-connector running"
    );

    wait_for_signal().await;
    tracing::info!("stopping: no new messages; flushing shards and waiting for writes and acks");
    source.stop_taking().await;
    for s in shards.iter() {
        let _ = s.send(shard::FlushNow).await;
    }
    let started = Instant::now();
    // During a FHIR outage the held messages cannot be written before an orchestrator's grace
    // period ends: after 10 s of it, stop without them. They stay unacked (the source stops
    // settling first), so the broker redelivers them.
    let mut outage_since: Option<Instant> = None;
    while shared.unsettled() > 0 && started.elapsed() < Duration::from_secs(300) {
        if shared.fhir_circuit.is_open() {
            if outage_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(10) {
                tracing::warn!(
                    held = shared.unsettled(),
                    "stopping during a FHIR outage: held messages go back to the broker"
                );
                break;
            }
        } else {
            outage_since = None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = shared.unsettled();
    source.close().await;
    server_handle.stop(true).await;
    for a in arbiters {
        a.stop();
    }
    let m = metrics::get();
    tracing::info!(
        received = shared.received.load(Ordering::SeqCst),
        acked = m.messages_acked.get(),
        dead_lettered = shared.dead_lettered.load(Ordering::SeqCst),
        unsettled = left,
        "stopped"
    );
    eprintln!(
        "iomt-connector stopped: received {}, acked {}, dead-lettered {}, unacked {left}",
        shared.received.load(Ordering::SeqCst),
        m.messages_acked.get(),
        shared.dead_lettered.load(Ordering::SeqCst)
    );
    if left > 0 {
        Err(RunError::Io(format!("{left} messages were not written before the stop; the broker will redeliver them")))
    } else {
        Ok(())
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
