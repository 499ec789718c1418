//! The running service: ingest → DeviceShard actors → FhirWriter actors (with the IdentityCache
//! actor) → ack or dead-letter. This file wires them, supervises the run, and shuts it down.

pub mod delivery;
pub mod identity;
pub mod ingest;
pub mod shard;
pub mod writer;

use crate::config::Settings;
use crate::fhir::FhirClient;
use crate::metrics;
use crate::template::device::DeviceMapping;
use crate::template::fhir::FhirMapping;
use actix::dev::ToEnvelope;
use actix::prelude::*;
use dashmap::DashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

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

    fn queued(&self) {
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

/// State the HTTP endpoints read.
pub struct Shared {
    pub broker_connected: AtomicBool,
    pub fhir_reachable: AtomicBool,
    pub mappings_loaded: AtomicBool,
    pub dry_run: bool,
    pub actors: DashMap<String, Arc<ActorStats>>,
    pub received: AtomicU64,
    pub settled: AtomicU64,
    pub dead_lettered: AtomicU64,
}

impl Shared {
    pub fn new(dry_run: bool) -> Arc<Shared> {
        Arc::new(Shared {
            broker_connected: AtomicBool::new(false),
            fhir_reachable: AtomicBool::new(dry_run),
            mappings_loaded: AtomicBool::new(false),
            dry_run,
            actors: DashMap::new(),
            received: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
        })
    }

    fn stats(&self, name: String, kind: &'static str) -> Arc<ActorStats> {
        let s = ActorStats::new(name.clone(), kind);
        self.actors.insert(name, s.clone());
        s
    }

    pub fn unsettled(&self) -> u64 {
        self.received.load(Ordering::SeqCst).saturating_sub(self.settled.load(Ordering::SeqCst))
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

fn load_mappings(s: &Settings) -> Result<(DeviceMapping, FhirMapping), RunError> {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).map_err(|e| RunError::Io(format!("cannot read {}: {e}", p.display())))
    };
    let located = |p: &std::path::Path, e: crate::template::TemplateErrors| {
        let file = p.display().to_string();
        e.0.iter().map(|e| e.located(&file)).collect::<Vec<_>>().join("\n")
    };
    let device = DeviceMapping::parse(&read(&s.mappings.device)?).map_err(|e| RunError::Mapping {
        path: s.mappings.device.display().to_string(),
        what: "device",
        problems: located(&s.mappings.device, e),
    })?;
    let fhir = FhirMapping::parse(&read(&s.mappings.fhir)?).map_err(|e| RunError::Mapping {
        path: s.mappings.fhir.display().to_string(),
        what: "FHIR",
        problems: located(&s.mappings.fhir, e),
    })?;
    Ok((device, fhir))
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
    let (device, fhir) = load_mappings(&settings)?;
    let system = actix_rt::System::new();
    let result = system.block_on(serve(Arc::new(settings), Arc::new(device), Arc::new(fhir), dry_run));
    System::current().stop();
    result
}

async fn serve(
    settings: Arc<Settings>,
    device: Arc<DeviceMapping>,
    fhir: Arc<FhirMapping>,
    dry_run: bool,
) -> Result<(), RunError> {
    let shared = Shared::new(dry_run);
    shared.mappings_loaded.store(true, Ordering::SeqCst);
    let client = if dry_run { None } else { Some(FhirClient::new(&settings.fhir)?) };

    let istats = shared.stats("identity".into(), "IdentityCache");
    let identity = Counted {
        addr: identity::IdentityCache::new(
            client.clone(),
            settings.identity.mode,
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
        let (c, f, id, batch, s) = (client.clone(), fhir.clone(), identity.clone(), settings.fhir.batch, stats.clone());
        let addr =
            writer::FhirWriter::start_in_arbiter(&place(i), move |_| writer::FhirWriter::new(c, f, id, batch, s));
        writers.push(Counted { addr, stats });
    }
    let writers = Arc::new(writers);
    let mut shards = Vec::new();
    for i in 0..settings.pipeline.shards {
        let stats = shared.stats(format!("shard-{i}"), "DeviceShard");
        let (f, w, s) = (fhir.clone(), writers.clone(), stats.clone());
        let (interval, max) = (Duration::from_millis(settings.pipeline.flush_interval_ms), flush_bound(&settings));
        let addr = shard::DeviceShard::start_in_arbiter(&place(i + settings.pipeline.writers), move |_| {
            shard::DeviceShard::new(f, w, interval, max, s)
        });
        shards.push(Counted { addr, stats });
    }
    let shards = Arc::new(shards);

    let server = crate::http::server(&settings.http.listen, shared.clone())
        .map_err(|e| RunError::Http { addr: settings.http.listen.clone(), message: e.to_string() })?;
    let server_handle = server.handle();
    actix_rt::spawn(server);

    if let Some(c) = client.clone() {
        let shared = shared.clone();
        actix_rt::spawn(async move {
            loop {
                let ok = c.ping().await.is_ok();
                if shared.fhir_reachable.swap(ok, Ordering::SeqCst) != ok {
                    tracing::info!(reachable = ok, url = c.base_url(), "FHIR server reachability changed");
                }
                tokio::time::sleep(Duration::from_secs(if ok { 10 } else { 2 })).await;
            }
        });
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (settle_tx, settle_rx) = tokio::sync::mpsc::unbounded_channel();
    let dl_channel = Arc::new(std::sync::Mutex::new(None));
    let settler =
        actix_rt::spawn(ingest::settler(settle_rx, dl_channel.clone(), settings.broker.clone(), shared.clone()));
    let ingest_ctx = ingest::Ingest::new(settings.clone(), device, shards.clone(), shared.clone(), settle_tx);
    let ingest = actix_rt::spawn(ingest::run(ingest_ctx, stop_rx, dl_channel));
    tracing::info!(
        queue = %settings.broker.queue,
        shards = settings.pipeline.shards,
        writers = settings.pipeline.writers,
        fhir = %settings.fhir.base_url,
        dry_run,
        http = %settings.http.listen,
        "iomt-connector running"
    );

    wait_for_signal().await;
    tracing::info!("stopping: no new messages; flushing shards and waiting for writes and acks");
    let _ = stop_tx.send(true);
    let keep_alive = ingest.await.ok().flatten();
    for s in shards.iter() {
        let _ = s.send(shard::FlushNow).await;
    }
    let started = Instant::now();
    while shared.unsettled() > 0 && started.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = shared.unsettled();
    drop(keep_alive);
    settler.abort();
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
        Err(RunError::Io(format!("{left} messages were still unacked after 300 s; the broker will redeliver them")))
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
