//! The mappings the service runs with, and their live reload: the files are watched (and SIGHUP
//! reloads); a new pair that parses is swapped in between two messages, and one that does not is
//! refused while the old pair keeps running. Each delivery is normalized, grouped and written with
//! the pair that was current when it arrived.

use crate::config::Settings;
use crate::engine::{self, Checked};
use crate::metrics;
use crate::status::Shared;
use crate::template::device::DeviceMapping;
use crate::template::fhir::FhirMapping;
use crate::template::located_all;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

/// A device mapping and a FHIR mapping, loaded together.
pub struct Mappings {
    pub device: DeviceMapping,
    pub fhir: FhirMapping,
    /// The first 12 hex digits of the sha256 of both files' text.
    pub version: String,
}

/// Why a pair of mapping files does not load.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: the {what} mapping is invalid:\n{problems}")]
    Mapping { path: String, what: &'static str, problems: String },
    #[error("{0}")]
    Io(String),
}

/// The pair in force; swapped whole.
pub struct Current(RwLock<Arc<Mappings>>);

impl Current {
    pub fn new(m: Mappings) -> Arc<Current> {
        Arc::new(Current(RwLock::new(Arc::new(m))))
    }

    pub fn get(&self) -> Arc<Mappings> {
        match self.0.read() {
            Ok(m) => m.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set(&self, m: Mappings) {
        match self.0.write() {
            Ok(mut slot) => *slot = Arc::new(m),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(m),
        }
    }
}

/// Reads and parses both files through the engine; every problem with its file, line and column.
/// Cross-check findings are warnings (MedTech runs such pairs: unmatched types are dead-lettered).
pub fn load(s: &Settings) -> Result<Mappings, LoadError> {
    let read =
        |p: &Path| std::fs::read_to_string(p).map_err(|e| LoadError::Io(format!("cannot read {}: {e}", p.display())));
    let (device_text, fhir_text) = (read(&s.mappings.device)?, read(&s.mappings.fhir)?);
    let (device_file, fhir_file) = (s.mappings.device.display().to_string(), s.mappings.fhir.display().to_string());
    let Checked { device, fhir, report } = engine::check(&device_text, Some(&fhir_text), &fhir_file);
    if !report.device.is_empty() {
        let problems = located_all(&report.device, &device_file);
        return Err(LoadError::Mapping { path: device_file, what: "device", problems });
    }
    if !report.fhir.is_empty() {
        let problems = located_all(&report.fhir, &fhir_file);
        return Err(LoadError::Mapping { path: fhir_file, what: "FHIR", problems });
    }
    for p in &report.cross {
        tracing::warn!("{}", p.located(&device_file));
    }
    let version = engine::version(&device_text, &fhir_text);
    Ok(Mappings { device, fhir: fhir.unwrap_or_default(), version })
}

fn modified(s: &Settings) -> (Option<SystemTime>, Option<SystemTime>) {
    let at = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (at(&s.mappings.device), at(&s.mappings.fhir))
}

/// Books the pair in force where readiness, `/metrics` and the log show it.
pub fn announce(m: &Mappings, shared: &Shared) {
    if let Ok(mut v) = shared.mappings_version.lock() {
        *v = m.version.clone();
    }
    metrics::get().mappings_info.reset();
    metrics::get().mappings_info.with_label_values(&[m.version.as_str()]).set(1);
}

/// Reloads when a file changes (checked every second) or on SIGHUP; runs until the process ends.
pub async fn watch(settings: Arc<Settings>, current: Arc<Current>, shared: Arc<Shared>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).ok();
    let mut seen = modified(&settings);
    loop {
        let hangup = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        let asked = tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => false,
            _ = hangup => true,
        };
        let now = modified(&settings);
        if !asked && now == seen {
            continue;
        }
        seen = now;
        reload(&settings, &current, &shared);
    }
}

fn reload(settings: &Settings, current: &Current, shared: &Shared) {
    let m = metrics::get();
    match load(settings) {
        // The files are back to the pair in force: whatever was refused in between is moot.
        Ok(new) if new.version == current.get().version => {
            if let Ok(mut r) = shared.mappings_refused.lock() {
                *r = None;
            }
            m.mappings_refused.set(0);
        }
        Ok(new) => {
            tracing::info!(version = %new.version, previous = %current.get().version, "mappings reloaded");
            announce(&new, shared);
            current.set(new);
            if let Ok(mut r) = shared.mappings_refused.lock() {
                *r = None;
            }
            m.mapping_reloads.with_label_values(&["applied"]).inc();
            m.mappings_refused.set(0);
        }
        Err(e) => {
            let active = current.get().version.clone();
            tracing::error!(active = %active, "new mappings refused; the active ones keep running: {e}");
            if let Ok(mut r) = shared.mappings_refused.lock() {
                *r = Some(e.to_string());
            }
            m.mapping_reloads.with_label_values(&["refused"]).inc();
            m.mappings_refused.set(1);
        }
    }
}
