//! Settings: `config/default.toml` (or `--config FILE`), every key overridable by an environment
//! variable `IOMT_<SECTION>__<KEY>` (e.g. `IOMT_BROKER__PREFETCH=500`), validated at start with a
//! message that names the key.

pub use crate::source::{Broker, EventHubs, EventHubsAuth, QueueType, StartAt, Topology, connection_string_part};
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Which source the messages come from.
    #[serde(default)]
    pub source: SourceSettings,
    pub broker: Broker,
    #[serde(default)]
    pub eventhubs: EventHubs,
    pub pipeline: Pipeline,
    pub fhir: Fhir,
    pub identity: IdentitySettings,
    pub mappings: Mappings,
    pub http: Http,
    #[serde(default)]
    pub log: Log,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    pub kind: crate::source::SourceKind,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// DeviceShard actors; a device always maps to the same shard.
    pub shards: usize,
    /// A shard writes its groups at least this often.
    pub flush_interval_ms: u64,
    /// ... or as soon as it holds this many measurements.
    pub flush_max_measurements: usize,
    /// FhirWriter actors; a device always maps to the same writer, so its writes stay in order.
    pub writers: usize,
    /// Threads the shards and writers run on (round-robin); 0 runs them on the ingest thread.
    pub threads: usize,
    /// What to do with a message no template matches: `drop` (ack and count) or `dead-letter`.
    #[serde(default)]
    pub unmatched: Option<Unmatched>,
    /// The most a SIGTERM waits for the messages in hand to be written.
    #[serde(default = "default_shutdown_timeout_secs")]
    pub shutdown_timeout_secs: u64,
    /// The bytes of messages held at once (taken, not yet settled); the source pauses above it.
    #[serde(default = "default_max_in_flight_bytes")]
    pub max_in_flight_bytes: usize,
    /// A larger message is dead-lettered `message-too-large` without being parsed.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
}

fn default_max_in_flight_bytes() -> usize {
    256 << 20
}

fn default_max_message_bytes() -> usize {
    16 << 20
}

fn default_shutdown_timeout_secs() -> u64 {
    25
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Fhir {
    pub base_url: String,
    pub auth: AuthKind,
    /// For `auth = "bearer"`.
    #[serde(default)]
    pub bearer_token: String,
    /// For `auth = "oauth2"` (client credentials).
    #[serde(default)]
    pub oauth2_token_url: String,
    #[serde(default)]
    pub oauth2_client_id: String,
    #[serde(default)]
    pub oauth2_client_secret: String,
    #[serde(default)]
    pub oauth2_scope: String,
    pub timeout_ms: u64,
    /// Quick retries of one request that can succeed later (network, timeout, 408, 429, 5xx) before
    /// the writer holds its groups and the circuit opens.
    pub max_retries: usize,
    /// The longest pause between retries (a `Retry-After` is capped by it too).
    pub max_backoff_ms: u64,
    /// Dead-letter (`fhir-unavailable`) what could not be written for this long; 0 (the default):
    /// hold it unacked for as long as the server is away.
    #[serde(default)]
    pub give_up_after_secs: u64,
    /// Write several Observations in one batch Bundle.
    pub batch: bool,
    /// Entries per batch Bundle, at most; more are sent as several Bundles, one after another. It
    /// keeps each request well inside `timeout_ms` on a slow server (a timed-out batch is retried,
    /// and what it had written must then be recovered from history) and under the servers' own
    /// limits (Azure Health Data Services takes 500). Past a few dozen entries, bigger Bundles do
    /// not write faster (scripts/bench.sh).
    #[serde(default = "default_max_batch_entries")]
    pub max_batch_entries: usize,
}

fn default_max_batch_entries() -> usize {
    100
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthKind {
    None,
    Bearer,
    Oauth2,
}

/// Named as in the settings (and MedTech) on the command line too: `--identity-mode Lookup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
pub enum IdentityMode {
    #[value(name = "Lookup")]
    Lookup,
    #[value(name = "Create")]
    Create,
    #[value(name = "LookupWithEncounter")]
    LookupWithEncounter,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySettings {
    pub mode: IdentityMode,
    /// Identifier system of Device resources; empty for none.
    #[serde(default)]
    pub device_identifier_system: String,
    pub cache_ttl_secs: u64,
    /// How long "not found" is remembered.
    pub miss_ttl_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Mappings {
    pub device: PathBuf,
    pub fhir: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Http {
    pub listen: String,
    /// Serve the mapping debugger at `/debugger` (the running mappings; Apply writes the mapping
    /// files, and only with `debugger_token` set).
    #[serde(default)]
    pub debugger: bool,
    /// When set, the debugger asks for it (the sign-in form, or `Authorization: Bearer …`).
    #[serde(default)]
    pub debugger_token: String,
    /// Host names (without port) the debugger answers besides the loopback ones: a page on another
    /// site that resolves its own name to this address (DNS rebinding) gets a 403.
    #[serde(default)]
    pub debugger_hosts: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `iomt_connector=debug`.
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log { format: LogFormat::Text, level: "info".into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

pub use crate::engine::Unmatched;
pub use crate::problems::ConfigError;
pub(crate) use crate::problems::Problems;

const SECTIONS: [&str; 9] =
    ["source", "broker", "eventhubs", "pipeline", "fhir", "identity", "mappings", "http", "log"];

/// `IOMT_BROKER_URL` (one underscore) is a typo of `IOMT_BROKER__URL`: refuse it rather than
/// ignore the value the operator meant to set.
fn check_env_names() -> Result<(), ConfigError> {
    for (name, _) in std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v))) {
        let Some(rest) = name.strip_prefix("IOMT_") else { continue };
        let lower = rest.to_lowercase();
        for s in SECTIONS {
            if lower.starts_with(&format!("{s}_")) && !lower.starts_with(&format!("{s}__")) {
                return Err(ConfigError::Invalid {
                    key: name.clone(),
                    message: format!(
                        "settings variables are IOMT_<SECTION>__<KEY> with two underscores: did you mean IOMT_{}__{}?",
                        s.to_uppercase(),
                        &rest[s.len() + 1..]
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Names the key (and the variable, when the value came from the environment).
fn load_error(e: figment::Error) -> ConfigError {
    let key = e.path.join(".").to_lowercase();
    let from_env = e.metadata.as_ref().is_some_and(|m| m.name.contains("environment"));
    let key = match (key.is_empty(), from_env) {
        (true, _) => "(file)".to_string(),
        (false, true) => format!("{key} (environment variable IOMT_{})", e.path.join("__").to_uppercase()),
        (false, false) => key,
    };
    let message = e.kind.to_string();
    ConfigError::Invalid { key, message }
}

/// The defaults shipped with the connector, used when no file is given.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

impl Settings {
    /// Defaults, then `file` (if any), then `IOMT_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let s = Settings::load_unchecked(file)?;
        s.validate()?;
        Ok(s)
    }

    /// As [`Settings::load`] without the checks across keys, for `config` to show settings that
    /// do not validate (a value of the wrong type still fails: there is nothing to show).
    pub fn load_unchecked(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Settings::figment(file)?.extract().map_err(load_error)
    }

    /// What [`Settings::load`] checks: every problem at once, each naming its key.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.validate()
    }

    /// Only the `[http]` section, for `health` (which needs no mappings, broker or FHIR server).
    pub fn load_http(file: Option<&Path>) -> Result<Http, ConfigError> {
        Settings::figment(file)?.extract_inner("http").map_err(load_error)
    }

    /// These settings as a TOML tree with every secret replaced by `***`: a key named like a
    /// secret whole, and inside every other text the parts `problems::redact` hides (passwords in
    /// URLs and PostgreSQL connection strings, access keys). What `config` prints.
    pub fn redacted(&self) -> toml::Value {
        let mut tree = toml::Value::try_from(self).unwrap_or_else(|e| toml::Value::String(e.to_string()));
        redact_tree(&mut tree, "");
        tree
    }

    /// Only `source.kind`, from the same sources.
    pub fn load_source_kind(file: Option<&Path>) -> Result<crate::source::SourceKind, ConfigError> {
        let s: SourceSettings = Settings::figment(file)?.extract_inner("source").map_err(load_error)?;
        Ok(s.kind)
    }

    /// Only the `[broker]` section, from the same sources: for the commands that publish to or
    /// inspect the queues without running the pipeline (no mapping files needed).
    pub fn load_broker(file: Option<&Path>) -> Result<Broker, ConfigError> {
        let b: Broker = Settings::figment(file)?.extract_inner("broker").map_err(load_error)?;
        b.validate()?;
        Ok(b)
    }

    /// Only the `[eventhubs]` credentials and endpoint, for `publish`/`simulate --eventhub`.
    pub fn load_eventhubs(file: Option<&Path>) -> Result<EventHubs, ConfigError> {
        let e: EventHubs = Settings::figment(file)?.extract_inner("eventhubs").map_err(load_error)?;
        let mut p = Problems::default();
        match e.auth {
            EventHubsAuth::ConnectionString if e.connection_string.is_empty() => p.bad(
                "eventhubs.connection_string",
                "is required to send to an event hub (or set eventhubs.auth = \"entra\")",
            ),
            _ => {}
        }
        ConfigError::from_problems(p.0)?;
        Ok(e)
    }

    fn figment(file: Option<&Path>) -> Result<Figment, ConfigError> {
        let mut fig = Figment::new().merge(Toml::string(DEFAULT_TOML));
        if let Some(f) = file {
            if !f.is_file() {
                return Err(ConfigError::Invalid {
                    key: "--config".into(),
                    message: format!("{} is not a readable file", f.display()),
                });
            }
            fig = fig.merge(Toml::file(f));
        }
        check_env_names()?;
        // Only IOMT_<SECTION>__<KEY> variables are settings; other IOMT_* names (a test suite's
        // IOMT_TEST_*, say) are not ours to refuse.
        let env = Env::prefixed("IOMT_")
            .filter(|k| SECTIONS.iter().any(|s| k.as_str().to_lowercase().starts_with(&format!("{s}__"))))
            .split("__");
        Ok(fig.merge(env))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Problems::default();
        self.source.kind.check(&self.broker, &self.eventhubs, &mut p);
        if self.pipeline.shards == 0 || self.pipeline.shards > 1024 {
            p.bad("pipeline.shards", format!("{} is outside 1..=1024", self.pipeline.shards));
        }
        if self.pipeline.writers == 0 || self.pipeline.writers > 1024 {
            p.bad("pipeline.writers", format!("{} is outside 1..=1024", self.pipeline.writers));
        }
        if self.pipeline.threads > 256 {
            p.bad("pipeline.threads", format!("{} is more than 256", self.pipeline.threads));
        }
        if self.pipeline.flush_interval_ms == 0 {
            p.bad("pipeline.flush_interval_ms", "must be at least 1");
        }
        if self.pipeline.max_message_bytes == 0 {
            p.bad("pipeline.max_message_bytes", "must be at least 1");
        } else if self.pipeline.max_in_flight_bytes < self.pipeline.max_message_bytes {
            p.bad(
                "pipeline.max_in_flight_bytes",
                format!(
                    "must be at least pipeline.max_message_bytes ({}), or the largest message could never be taken",
                    self.pipeline.max_message_bytes
                ),
            );
        }
        if self.pipeline.flush_max_measurements == 0 {
            p.bad("pipeline.flush_max_measurements", "must be at least 1");
        }
        match reqwest::Url::parse(&self.fhir.base_url) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
            _ => p.bad("fhir.base_url", format!("'{}' is not an http(s) URL", self.fhir.base_url)),
        }
        match self.fhir.auth {
            AuthKind::Bearer if self.fhir.bearer_token.is_empty() => {
                p.bad("fhir.bearer_token", "is required when fhir.auth = \"bearer\"");
            }
            AuthKind::Oauth2 => {
                for (key, v) in [
                    ("fhir.oauth2_token_url", &self.fhir.oauth2_token_url),
                    ("fhir.oauth2_client_id", &self.fhir.oauth2_client_id),
                    ("fhir.oauth2_client_secret", &self.fhir.oauth2_client_secret),
                ] {
                    if v.is_empty() {
                        p.bad(key, "is required when fhir.auth = \"oauth2\"");
                    }
                }
            }
            _ => {}
        }
        if self.fhir.max_batch_entries == 0 {
            p.bad("fhir.max_batch_entries", "must be at least 1");
        }
        if self.fhir.timeout_ms == 0 {
            p.bad("fhir.timeout_ms", "must be at least 1");
        }
        if self.http.listen.parse::<SocketAddr>().is_err() {
            p.bad("http.listen", format!("'{}' is not an address like 127.0.0.1:8080", self.http.listen));
        }
        for (key, f) in [("mappings.device", &self.mappings.device), ("mappings.fhir", &self.mappings.fhir)] {
            if !f.is_file() {
                p.bad(key, format!("{} is not a readable file", f.display()));
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            p.bad("log.level", format!("'{}' is not a tracing filter (e.g. info, debug)", self.log.level));
        }
        ConfigError::from_problems(p.0)
    }

    /// The Device identifier system, if one is set.
    /// What to do with a message no template matches (`pipeline.unmatched`, else the deprecated
    /// `broker.unmatched`, else drop).
    pub fn unmatched(&self) -> Unmatched {
        self.pipeline.unmatched.or(self.broker.unmatched).unwrap_or(Unmatched::Drop)
    }

    /// Settings still read from an old place, each with where it belongs now: logged at start.
    pub fn deprecations(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.broker.unmatched.is_some() {
            let used = if self.pipeline.unmatched.is_some() { "ignored: pipeline.unmatched is set" } else { "used" };
            out.push(format!("broker.unmatched is deprecated ({used}); set pipeline.unmatched instead"));
        }
        out
    }

    pub fn device_system(&self) -> Option<&str> {
        Some(self.identity.device_identifier_system.as_str()).filter(|s| !s.is_empty())
    }
}

/// Keys whose whole value is a secret: `bearer_token`, `debugger_token`, `client_secret`,
/// `oauth2_client_secret`, any `*password` (`oauth2_token_url` is an address, not a secret).
fn secret_key(key: &str) -> bool {
    ["token", "secret", "password", "key"].iter().any(|s| key.ends_with(s))
}

fn redact_tree(v: &mut toml::Value, key: &str) {
    match v {
        toml::Value::String(s) if !s.is_empty() && secret_key(key) => *s = "***".into(),
        toml::Value::String(s) => *s = crate::problems::redact(s),
        toml::Value::Array(items) => items.iter_mut().for_each(|i| redact_tree(i, key)),
        toml::Value::Table(t) => t.iter_mut().for_each(|(k, v)| redact_tree(v, k)),
        _ => {}
    }
}

#[cfg(test)]
// figment's Jail closures return its (large) error type; not ours to shrink.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load() {
        let fig = Figment::new().merge(Toml::string(DEFAULT_TOML));
        let s: Settings = fig.extract().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.identity.mode, IdentityMode::Create);
        assert_eq!(s.unmatched(), Unmatched::Drop);
        assert!(s.deprecations().is_empty());
    }

    #[test]
    fn the_old_broker_unmatched_key_still_works_with_a_deprecation() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("m.json", "{}")?;
            jail.set_env("IOMT_MAPPINGS__DEVICE", "m.json");
            jail.set_env("IOMT_MAPPINGS__FHIR", "m.json");
            jail.set_env("IOMT_BROKER__UNMATCHED", "dead-letter");
            let s = Settings::load(None).expect("loads");
            assert_eq!(s.unmatched(), Unmatched::DeadLetter);
            let d = s.deprecations();
            assert!(d.len() == 1 && d[0].contains("pipeline.unmatched"), "{d:?}");
            jail.set_env("IOMT_PIPELINE__UNMATCHED", "drop");
            let s = Settings::load(None).expect("loads");
            assert_eq!(s.unmatched(), Unmatched::Drop, "the new key wins");
            assert!(s.deprecations()[0].contains("ignored"));
            Ok(())
        });
    }

    #[test]
    fn a_bad_environment_value_names_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("IOMT_BROKER__PREFETCH", "lots");
            let e = Settings::load(None).expect_err("bad prefetch");
            let msg = e.to_string();
            assert!(msg.contains("broker.prefetch") && msg.contains("IOMT_BROKER__PREFETCH"), "{msg}");
            Ok(())
        });
    }

    #[test]
    fn other_iomt_variables_are_left_alone_but_typos_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("m.json", "{}")?;
            jail.set_env("IOMT_MAPPINGS__DEVICE", "m.json");
            jail.set_env("IOMT_MAPPINGS__FHIR", "m.json");
            jail.set_env("IOMT_TEST_FHIR_URL", "http://x");
            assert!(Settings::load(None).is_ok());
            jail.set_env("IOMT_BROKER_QUEUE", "q");
            let msg = Settings::load(None).expect_err("typo").to_string();
            assert!(msg.contains("IOMT_BROKER__QUEUE"), "{msg}");
            Ok(())
        });
    }

    #[test]
    fn validation_names_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("m.json", "{}")?;
            jail.set_env("IOMT_MAPPINGS__DEVICE", "m.json");
            jail.set_env("IOMT_MAPPINGS__FHIR", "m.json");
            jail.set_env("IOMT_PIPELINE__SHARDS", "0");
            let msg = Settings::load(None).expect_err("0 shards").to_string();
            assert!(msg.contains("pipeline.shards"), "{msg}");
            jail.set_env("IOMT_PIPELINE__SHARDS", "2");
            jail.set_env("IOMT_FHIR__AUTH", "bearer");
            let msg = Settings::load(None).expect_err("no token").to_string();
            assert!(msg.contains("fhir.bearer_token"), "{msg}");
            Ok(())
        });
    }

    #[test]
    fn every_problem_of_an_event_hubs_source_is_reported_at_once() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("m.json", "{}")?;
            jail.set_env("IOMT_MAPPINGS__DEVICE", "m.json");
            jail.set_env("IOMT_MAPPINGS__FHIR", "m.json");
            jail.set_env("IOMT_SOURCE__KIND", "eventhubs");
            jail.set_env(
                "IOMT_EVENTHUBS__CONNECTION_STRING",
                "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=listen",
            );
            jail.set_env("IOMT_EVENTHUBS__START_POSITION", "yesterday");
            jail.set_env("IOMT_PIPELINE__SHARDS", "0");
            let msg = Settings::load(None).expect_err("several problems").to_string();
            for key in [
                "eventhubs.connection_string: has no SharedAccessKey=",
                "eventhubs.hub",
                "eventhubs.checkpoint_postgres_url",
                "eventhubs.start_position: 'yesterday'",
                "eventhubs.dead_letter_hub",
                "pipeline.shards",
            ] {
                assert!(msg.contains(key), "{key} in {msg}");
            }
            assert!(msg.starts_with("6 configuration problems"), "{msg}");
            // The [broker] section is not what this source reads: not validated.
            jail.set_env("IOMT_BROKER__PREFETCH", "0");
            assert!(!Settings::load(None).expect_err("still bad").to_string().contains("broker.prefetch"));

            jail.set_env("IOMT_PIPELINE__SHARDS", "2");
            jail.set_env("IOMT_EVENTHUBS__CONNECTION_STRING", "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=listen;SharedAccessKey=abc;EntityPath=devices");
            jail.set_env("IOMT_EVENTHUBS__START_POSITION", "2026-11-24T00:00:00Z");
            jail.set_env("IOMT_EVENTHUBS__CHECKPOINT_POSTGRES_URL", "host=127.0.0.1 user=postgres dbname=test");
            jail.set_env("IOMT_EVENTHUBS__DEAD_LETTER_HUB", "devices-dead-letter");
            let s = Settings::load(None).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(s.eventhubs.hub_name(), "devices");
            assert_eq!(s.eventhubs.namespace_host(), "ns.servicebus.windows.net");
            assert!(matches!(s.eventhubs.start_position(), Some(StartAt::Enqueued(_))));
            Ok(())
        });
    }
}
