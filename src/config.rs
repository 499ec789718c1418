//! Settings: `config/default.toml` (or `--config FILE`), every key overridable by an environment
//! variable `IOMT_<SECTION>__<KEY>` (e.g. `IOMT_BROKER__PREFETCH=500`), validated at start with a
//! message that names the key.

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub broker: Broker,
    pub pipeline: Pipeline,
    pub fhir: Fhir,
    pub identity: IdentitySettings,
    pub mappings: Mappings,
    pub http: Http,
    #[serde(default)]
    pub log: Log,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Broker {
    /// `amqp://user:password@host:port/vhost`.
    pub url: String,
    pub queue: String,
    /// Unacked messages the broker may hand us at once: also the bound on messages in memory.
    pub prefetch: u16,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    /// Declare the queue, the dead-letter exchange and queue at start (durable).
    pub declare: bool,
    /// What to do with a message no template matches: `drop` (ack and count) or `dead-letter`.
    pub unmatched: Unmatched,
    /// Seconds between reconnection attempts when the broker is unreachable.
    pub reconnect_delay_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unmatched {
    Drop,
    DeadLetter,
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
    /// Retries of a request that can succeed later (network, 5xx, 429) before the group fails.
    pub max_retries: usize,
    pub max_backoff_ms: u64,
    /// Write several Observations in one batch Bundle.
    pub batch: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthKind {
    None,
    Bearer,
    Oauth2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum IdentityMode {
    Lookup,
    Create,
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

/// A setting that cannot be used, with the key to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration key {key}: {message}")]
    Invalid { key: String, message: String },
}

const SECTIONS: [&str; 7] = ["broker", "pipeline", "fhir", "identity", "mappings", "http", "log"];

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
        let fig = fig.merge(env);
        let s: Settings = fig.extract().map_err(load_error)?;
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| Err(ConfigError::Invalid { key: key.to_string(), message });
        if !self.broker.url.starts_with("amqp://") && !self.broker.url.starts_with("amqps://") {
            return bad("broker.url", format!("'{}' is not an amqp:// or amqps:// URL", self.broker.url));
        }
        if self.broker.queue.trim().is_empty() {
            return bad("broker.queue", "must name a queue".into());
        }
        if self.broker.prefetch == 0 {
            return bad("broker.prefetch", "must be at least 1".into());
        }
        if self.broker.dead_letter_exchange.trim().is_empty() {
            return bad("broker.dead_letter_exchange", "must name an exchange: nothing may be dropped silently".into());
        }
        if self.pipeline.shards == 0 || self.pipeline.shards > 1024 {
            return bad("pipeline.shards", format!("{} is outside 1..=1024", self.pipeline.shards));
        }
        if self.pipeline.writers == 0 || self.pipeline.writers > 1024 {
            return bad("pipeline.writers", format!("{} is outside 1..=1024", self.pipeline.writers));
        }
        if self.pipeline.threads > 256 {
            return bad("pipeline.threads", format!("{} is more than 256", self.pipeline.threads));
        }
        if self.pipeline.flush_interval_ms == 0 {
            return bad("pipeline.flush_interval_ms", "must be at least 1".into());
        }
        if self.pipeline.flush_max_measurements == 0 {
            return bad("pipeline.flush_max_measurements", "must be at least 1".into());
        }
        match reqwest::Url::parse(&self.fhir.base_url) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
            _ => return bad("fhir.base_url", format!("'{}' is not an http(s) URL", self.fhir.base_url)),
        }
        match self.fhir.auth {
            AuthKind::Bearer if self.fhir.bearer_token.is_empty() => {
                return bad("fhir.bearer_token", "is required when fhir.auth = \"bearer\"".into());
            }
            AuthKind::Oauth2 => {
                for (key, v) in [
                    ("fhir.oauth2_token_url", &self.fhir.oauth2_token_url),
                    ("fhir.oauth2_client_id", &self.fhir.oauth2_client_id),
                    ("fhir.oauth2_client_secret", &self.fhir.oauth2_client_secret),
                ] {
                    if v.is_empty() {
                        return bad(key, "is required when fhir.auth = \"oauth2\"".into());
                    }
                }
            }
            _ => {}
        }
        if self.fhir.timeout_ms == 0 {
            return bad("fhir.timeout_ms", "must be at least 1".into());
        }
        if self.http.listen.parse::<SocketAddr>().is_err() {
            return bad("http.listen", format!("'{}' is not an address like 127.0.0.1:8080", self.http.listen));
        }
        for (key, p) in [("mappings.device", &self.mappings.device), ("mappings.fhir", &self.mappings.fhir)] {
            if !p.is_file() {
                return bad(key, format!("{} is not a readable file", p.display()));
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return bad("log.level", format!("'{}' is not a tracing filter (e.g. info, debug)", self.log.level));
        }
        Ok(())
    }

    /// The Device identifier system, if one is set.
    pub fn device_system(&self) -> Option<&str> {
        Some(self.identity.device_identifier_system.as_str()).filter(|s| !s.is_empty())
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
        assert_eq!(s.broker.unmatched, Unmatched::Drop);
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
}
