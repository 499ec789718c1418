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
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

/// A device mapping and a FHIR mapping, loaded together.
pub struct Mappings {
    pub device: DeviceMapping,
    pub fhir: FhirMapping,
    /// The first 12 hex digits of the sha256 of both files' text.
    pub version: String,
    /// The texts this pair was loaded from: what `/debugger` shows as running, which the files
    /// on disk need not be any more (a refused reload, an edit not yet picked up).
    pub device_text: String,
    pub fhir_text: String,
}

/// Why a pair of mapping files does not load.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: the {what} mapping is invalid:\n{problems}")]
    Mapping { path: String, what: &'static str, problems: String },
    #[error("{0}")]
    Io(String),
}

/// The pair in force; swapped whole. `reloading` is held while a reload reads the files and while
/// the debugger's Apply writes them, so a reload never reads a new device file beside the old FHIR
/// file (and runs a pair nobody wrote).
pub struct Current(RwLock<Arc<Mappings>>, Mutex<()>);

impl Current {
    pub fn new(m: Mappings) -> Arc<Current> {
        Arc::new(Current(RwLock::new(Arc::new(m)), Mutex::new(())))
    }

    fn reloading(&self) -> MutexGuard<'_, ()> {
        self.1.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
    Ok(Mappings { device, fhir: fhir.unwrap_or_default(), version, device_text, fhir_text })
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

/// What a reload did; the debugger's Apply shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "reload", rename_all = "lowercase")]
pub enum Reloaded {
    /// A new pair is in force.
    Applied { version: String },
    /// The files hold the pair already in force.
    Unchanged { version: String },
    /// The files do not load; `running` keeps running.
    Refused { running: String, why: String },
}

fn reload(settings: &Settings, current: &Current, shared: &Shared) -> Reloaded {
    let _files = current.reloading();
    reload_held(settings, current, shared)
}

/// A reload, with `Current::reloading` held by the caller.
fn reload_held(settings: &Settings, current: &Current, shared: &Shared) -> Reloaded {
    let m = metrics::get();
    let refused = |why: Option<String>| {
        m.mappings_refused.set(i64::from(why.is_some()));
        if let Ok(mut r) = shared.mappings_refused.lock() {
            *r = why;
        }
    };
    match load(settings) {
        // The files are back to the pair in force: whatever was refused in between is moot.
        Ok(new) if new.version == current.get().version => {
            refused(None);
            Reloaded::Unchanged { version: new.version }
        }
        Ok(new) => {
            tracing::info!(version = %new.version, previous = %current.get().version, "mappings reloaded");
            announce(&new, shared);
            let version = new.version.clone();
            current.set(new);
            refused(None);
            m.mapping_reloads.with_label_values(&["applied"]).inc();
            Reloaded::Applied { version }
        }
        Err(e) => {
            let running = current.get().version.clone();
            tracing::error!(active = %running, "new mappings refused; the active ones keep running: {e}");
            refused(Some(e.to_string()));
            m.mapping_reloads.with_label_values(&["refused"]).inc();
            Reloaded::Refused { running, why: e.to_string() }
        }
    }
}

/// What the debugger under `run` reaches of the running service: the pair in force, the last
/// refusal, and the watched files (for Apply).
#[derive(Clone)]
pub struct Live {
    pub settings: Arc<Settings>,
    pub current: Arc<Current>,
    pub shared: Arc<Shared>,
}

impl Live {
    /// Why the last reload was refused, while the files on disk still do not load.
    pub fn refused(&self) -> Option<String> {
        self.shared.mappings_refused.lock().ok().and_then(|r| r.clone())
    }

    /// Writes a pair the engine loads over the watched files and reloads it at once, under the
    /// reload lock, so the watcher cannot load half of it (nor reload it first, which would make
    /// this reload say "unchanged"); the watcher then finds it in force.
    pub fn apply(&self, device: &str, fhir: &str) -> std::io::Result<Reloaded> {
        let _files = self.current.reloading();
        let (device_path, fhir_path) = (&self.settings.mappings.device, &self.settings.mappings.fhir);
        let before = std::fs::read_to_string(device_path).ok();
        write_atomically(device_path, device)?;
        if let Err(e) = write_atomically(fhir_path, fhir) {
            // Put the device file back: beside the old FHIR file it is a pair nobody asked for.
            if let Some(old) = before {
                let _ = write_atomically(device_path, &old);
            }
            return Err(e);
        }
        Ok(reload_held(&self.settings, &self.current, &self.shared))
    }
}

/// Writes beside the file and renames over it: a reader (the watcher, an editor) sees the old text
/// or the new, never a half-written file.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let aside = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = std::fs::File::create(&aside).and_then(|mut f| {
        f.write_all(text.as_bytes())?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|_| std::fs::rename(&aside, path)) {
        let _ = std::fs::remove_file(&aside);
        return Err(std::io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display())));
    }
    Ok(())
}
