//! The composition root: reads the settings' choices, starts the FHIR store, the HTTP endpoints,
//! the pipeline's stages and the source, and shuts them down in order on SIGTERM or SIGINT. The
//! stages themselves are in `pipeline/`; the sources in `source/`.

use crate::config::{IdentityMode, Settings};
use crate::fhir::{DryRun, FhirClient, FhirStore};
use crate::metrics;
use crate::pipeline::{Pipeline, mappings};
use crate::source::Source;
use crate::status::Shared;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::task::TaskTracker;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Mappings(#[from] mappings::LoadError),
    #[error("{0}")]
    Fhir(#[from] crate::fhir::FhirError),
    #[error("cannot listen on {addr} (http.listen): {message}")]
    Http { addr: String, message: String },
    #[error("{0}")]
    Io(String),
}

/// Runs the service until SIGTERM or SIGINT, then stops consuming, flushes every shard, waits for
/// the writes and the acks (at most `pipeline.shutdown_timeout_secs`), and returns.
pub fn run(settings: Settings, dry_run: bool) -> Result<(), RunError> {
    for d in settings.deprecations() {
        tracing::warn!("{d}");
    }
    let mappings = mappings::load(&settings)?;
    let client = if dry_run { None } else { Some(FhirClient::new(&settings.fhir)?) };
    let parts = Parts {
        store: match &client {
            Some(c) => Arc::new(c.clone()),
            None => Arc::new(DryRun::default()),
        },
        probe: client,
        // A dry run has no server to look up in: its ids are the ones Create makes.
        identity: if dry_run { IdentityMode::Create } else { settings.identity.mode },
        source: crate::source::registry::configured(&settings),
        dry_run,
    };
    let system = actix_rt::System::new();
    let result = system.block_on(serve(Arc::new(settings), mappings, parts, wait_for_signal()));
    actix::System::current().stop();
    result
}

/// What the settings chose: where Observations go, where messages come from.
pub struct Parts {
    pub store: Arc<dyn FhirStore>,
    /// The real server's client, probed for readiness (`None`: nothing to probe).
    pub probe: Option<FhirClient>,
    pub identity: IdentityMode,
    pub source: Box<dyn Source>,
    pub dry_run: bool,
}

/// The service until `shutdown` resolves (mini-redis's shape: the signal is passed in).
pub async fn serve(
    settings: Arc<Settings>,
    mappings: mappings::Mappings,
    parts: Parts,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let Parts { store, probe: client, identity, source, dry_run } = parts;
    let shared = Shared::new(dry_run, store.circuit().clone());
    mappings::announce(&mappings, &shared);
    let current = mappings::Current::new(mappings);
    // Bound before any actor starts: a port in use ends the start with its message, and nothing
    // half-started is left to fail on its own.
    let live = mappings::Live { settings: settings.clone(), current: current.clone(), shared: shared.clone() };
    let debugger = settings.http.debugger.then(|| crate::studio::Studio {
        device: settings.mappings.device.clone(),
        fhir: settings.mappings.fhir.clone(),
        messages: settings.mappings.device.parent().map(|d| d.join("messages")).unwrap_or_default(),
        token: settings.http.debugger_token.clone(),
        hosts: settings.http.debugger_hosts.clone(),
        session: crate::studio::new_session(),
        live: Some(live),
    });
    let server = crate::http::server(&settings.http.listen, shared.clone(), debugger)
        .map_err(|e| RunError::Http { addr: settings.http.listen.clone(), message: e.to_string() })?;
    let server_handle = server.handle();
    actix_rt::spawn(server);
    if let Some(c) = client {
        actix_rt::spawn(probe(c, shared.clone()));
    }
    actix_rt::spawn(mappings::watch(settings.clone(), current.clone(), shared.clone()));

    let work = TaskTracker::new();
    let (kind, reads, bound) = (source.kind(), source.reads(), source.in_flight_bound());
    metrics::get().source_info.with_label_values(&[kind]).set(1);
    let pipeline = Pipeline::start(&settings, store.clone(), identity, current, &shared, bound, work.clone());
    let source = source.start(pipeline.intake.clone(), shared.clone());
    tracing::info!(
        source = kind,
        reads = %reads,
        shards = settings.pipeline.shards,
        writers = settings.pipeline.writers,
        fhir = %settings.fhir.base_url,
        dry_run,
        http = %settings.http.listen,
        "iomt-connector running"
    );

    shutdown.await;
    let limit = Duration::from_secs(settings.pipeline.shutdown_timeout_secs);
    let left = stop(source, &pipeline, &work, store.circuit().clone(), limit).await;
    server_handle.stop(false).await;
    pipeline.stop();
    let m = metrics::get();
    let (received, acked, dead) = (m.messages_received.get(), m.messages_acked.get(), metrics::dead_lettered_total());
    tracing::info!(received, acked, dead_lettered = dead, unsettled = left, "stopped");
    eprintln!("iomt-connector stopped: received {received}, acked {acked}, dead-lettered {dead}, unacked {left}");
    if left > 0 {
        Err(RunError::Io(format!("{left} messages were not written before the stop; the broker will redeliver them")))
    } else {
        Ok(())
    }
}

/// Stops taking messages, writes what is in hand and closes the source, all within `limit`;
/// returns how many messages are left unacked (the broker delivers them again).
async fn stop(
    mut source: Box<dyn crate::source::Running>,
    pipeline: &Pipeline,
    work: &TaskTracker,
    circuit: Arc<crate::fhir::circuit::Circuit>,
    limit: Duration,
) -> i64 {
    tracing::info!("stopping: no new messages; flushing shards and waiting for writes and acks");
    // Taking no more and waiting for the work in hand get all of `limit` but the last few
    // seconds, which are closing's (the final acks or checkpoints, the partitions released).
    let closing = CLOSING.min(limit / 2);
    let draining = limit - closing;
    let drain = async {
        source.stop_taking().await;
        pipeline.flush().await;
        work.close();
        tokio::select! {
            _ = work.wait() => true,
            _ = give_up(circuit, draining) => false,
        }
    };
    let done = tokio::time::timeout(draining, drain).await.unwrap_or(false);
    let left = metrics::get().unacked.get().max(0);
    if !done {
        tracing::warn!(held = left, "stopping with messages not written: they go back to the broker");
    }
    if tokio::time::timeout(closing, source.close()).await.is_err() {
        tracing::warn!(
            after_s = closing.as_secs(),
            "the source did not close in time; the broker redelivers what it did not hear about"
        );
    }
    left
}

/// The part of a stop kept for closing the source.
const CLOSING: Duration = Duration::from_secs(5);

/// When a stop stops waiting for the messages in hand: `limit` after it began, or once the FHIR
/// server has been unavailable for 10 s in a row (they cannot be written before an orchestrator's
/// grace period ends; unacked, the broker delivers them again).
async fn give_up(circuit: Arc<crate::fhir::circuit::Circuit>, limit: Duration) {
    const OUTAGE: Duration = Duration::from_secs(10);
    let deadline = tokio::time::Instant::now() + limit;
    let mut outage_since: Option<tokio::time::Instant> = None;
    while tokio::time::Instant::now() < deadline {
        if circuit.is_open() {
            if outage_since.get_or_insert_with(tokio::time::Instant::now).elapsed() >= OUTAGE {
                return;
            }
        } else {
            outage_since = None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Probes `GET metadata` (every 10 s, every second while writes are held: the held work resumes
/// as soon as a probe answers and the circuit closes, not at the end of the writers' backoff);
/// books the outage time as it goes (`iomt_fhir_outage_seconds_total`).
async fn probe(client: FhirClient, shared: Arc<Shared>) {
    loop {
        let ok = client.ping().await.is_ok();
        if shared.fhir_reachable.swap(ok, Ordering::SeqCst) != ok {
            tracing::info!(reachable = ok, url = client.base_url(), "FHIR server reachability changed");
        }
        let calm = ok && client.circuit().state().is_none();
        tokio::time::sleep(Duration::from_secs(if calm { 10 } else { 1 })).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::memory::MemoryStore;
    use crate::model::kind::ErrorKind;
    use crate::source::{Status, memory};
    use serde_json::{Value, json};

    /// The whole service in the test process: the in-memory source, every stage, the in-memory
    /// FHIR server; no broker, no FHIR server, no network but the HTTP endpoints on a free port.
    #[actix_rt::test]
    async fn a_whole_pipeline_runs_in_process_and_settles_every_message() {
        let mut settings = Settings::load(None).unwrap_or_else(|e| panic!("{e}"));
        settings.http.listen = "127.0.0.1:0".into();
        settings.pipeline.flush_interval_ms = 20;
        settings.pipeline.unmatched = Some(crate::config::Unmatched::DeadLetter);
        let mappings = mappings::load(&settings).unwrap_or_else(|e| panic!("{e}"));
        let store = MemoryStore::new();
        let (source, feed) = memory::memory();
        let mut bodies: Vec<Value> = Vec::new();
        for d in 0..3 {
            for s in 0..5 {
                let at = format!("2026-03-15T08:30:{s:02}.000Z");
                bodies.push(json!({"deviceId": format!("d{d}"), "patientId": "p", "measurementTime": at, "heartRate": 60 + d * 10 + s}));
            }
        }
        bodies.push(json!({"deviceId": "d0", "patientId": "p", "measurementTime": "2026-03-15T08:31:00Z", "systolic": 120, "diastolic": 80}));
        for b in &bodies {
            feed.push(&serde_json::to_vec(b).unwrap_or_default());
        }
        feed.push(b"{ not json");
        feed.push(br#"{"nothing": "matches"}"#);
        let total = bodies.len() + 2;
        let parts = Parts {
            store: store.clone(),
            probe: None,
            identity: IdentityMode::Create,
            source: Box::new(source),
            dry_run: false,
        };
        let until = feed.clone();
        let shutdown = async move { until.until_settled(total).await };
        serve(Arc::new(settings), mappings, parts, shutdown).await.unwrap_or_else(|e| panic!("{e}"));

        let settled: std::collections::HashMap<usize, Status> = feed.settled().into_iter().collect();
        assert_eq!(settled.len(), total);
        for n in 0..bodies.len() {
            assert_eq!(settled[&n], Status::Persisted, "message {n}");
        }
        let kind = |n: usize| match &settled[&n] {
            Status::DeadLettered(f) => f.kind,
            Status::Persisted => panic!("message {n} persisted"),
        };
        assert_eq!(kind(bodies.len()), ErrorKind::InvalidJson);
        assert_eq!(kind(bodies.len() + 1), ErrorKind::NoTemplateMatched);
        let observations = store.all("Observation");
        assert_eq!(observations.len(), 4, "three heart-rate windows and a blood pressure");
        for d in 0..3 {
            let want: Vec<String> = (0..5).map(|s| (60 + d * 10 + s).to_string()).collect();
            let hr = observations
                .iter()
                .filter_map(|o| o.pointer("/valueSampledData/data").and_then(Value::as_str))
                .map(|data| data.split_whitespace().filter(|v| *v != "E").map(str::to_string).collect::<Vec<_>>())
                .find(|got| *got == want);
            assert!(hr.is_some(), "device d{d}: {want:?} in {observations:?}");
        }
    }
}
