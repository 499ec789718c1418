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
    /// Deprecated: `pipeline.unmatched` (read when that is not set, with a warning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unmatched: Option<Unmatched>,
    /// Seconds between reconnection attempts when the broker is unreachable.
    pub reconnect_delay_secs: u64,
    /// The type of the queues the connector declares: `quorum` (replicated, with a delivery limit)
    /// or `classic`. Queues that already exist are used as they are.
    #[serde(default)]
    pub queue_type: QueueType,
    /// Quorum queues: deliveries of one message before the broker dead-letters it (a message that
    /// keeps crashing the process must not loop forever). 0: no limit.
    #[serde(default = "default_delivery_limit")]
    pub delivery_limit: u32,
    /// `queue`: every instance consumes `queue`. `sharded`: devices are spread by id over
    /// `shard_queues` queues by a consistent-hash exchange, each consumed by one instance at a time.
    #[serde(default)]
    pub topology: Topology,
    /// Sharded: how many shard queues (`{queue}.shard-0` ...); the exchange is named `queue`.
    #[serde(default = "default_shard_queues")]
    pub shard_queues: u16,
    /// Sharded: this instance's index, 0-based, and how many instances share the shard queues.
    /// Instance `i` is the first consumer of shard queues `k` with `k % instances == i`, and a
    /// standby on the others.
    #[serde(default)]
    pub instance: u16,
    #[serde(default = "default_instances")]
    pub instances: u16,
    /// Sharded: the exchange hashes this header's value instead of the routing key; empty: the
    /// routing key (the device id) is hashed.
    #[serde(default)]
    pub hash_header: String,
    /// RabbitMQ's management API (`http://host:15672`), to learn on which shard queues this instance
    /// is the active consumer (`/actors`, `/metrics`); empty: not asked (activity is then unknown).
    #[serde(default)]
    pub management_url: String,
    /// Sharded: when this instance takes over a shard queue (its first delivery there is a
    /// redelivery), it waits this long before processing, so that the FHIR writes the previous
    /// consumer still had in flight land first (keep it at least `fhir.timeout_ms`).
    #[serde(default = "default_takeover_grace_ms")]
    pub takeover_grace_ms: u64,
}

fn default_takeover_grace_ms() -> u64 {
    10_000
}

fn default_shard_queues() -> u16 {
    6
}

fn default_instances() -> u16 {
    1
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    #[default]
    Queue,
    Sharded,
}

fn default_delivery_limit() -> u32 {
    20
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    #[default]
    Quorum,
    Classic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unmatched {
    Drop,
    DeadLetter,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    pub kind: crate::source::SourceKind,
}

/// `source.kind = "eventhubs"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventHubs {
    /// `Endpoint=sb://NAMESPACE.servicebus.windows.net/;SharedAccessKeyName=…;SharedAccessKey=…;EntityPath=HUB`
    /// (the hub may be given as `hub` instead). For `auth = "connection-string"`.
    pub connection_string: String,
    /// `connection-string` (SAS) or `entra` (Microsoft Entra client credentials).
    pub auth: EventHubsAuth,
    /// The fully qualified namespace, e.g. `myns.servicebus.windows.net` (`auth = "entra"`).
    pub namespace: String,
    pub hub: String,
    pub consumer_group: String,
    /// `auth = "entra"`: the app registration's tenant, client id and secret.
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: String,
    /// Where Entra tokens come from; another authority (a sovereign cloud) may be set here.
    pub authority_host: String,
    /// Talk to this AMQP address instead of the namespace's (`amqp://host:port`: plain AMQP, as the
    /// Event Hubs emulator and the test peer speak; `amqps://` for a gateway).
    pub custom_endpoint: String,
    /// The checkpoint store: a PostgreSQL connection string (`host=… user=… dbname=…` or a
    /// `postgres://` URL). Ownership and checkpoints of every instance of the consumer group live there.
    pub checkpoint_postgres_url: String,
    /// Where a partition without a checkpoint starts: `earliest`, `latest`, or an enqueued time
    /// (RFC 3339, e.g. `2026-11-24T00:00:00Z`).
    pub start_position: String,
    /// This instance's name in the ownership table; empty: host name and process id.
    pub instance_id: String,
    /// An instance that has not renewed its ownership for this long is taken to be gone, and its
    /// partitions are taken over.
    pub ownership_expiry_secs: u64,
    /// How often an instance renews its ownership and looks for partitions to claim (at most one
    /// per round; after the first interval, a round that claimed a free one is followed by the next
    /// 100 ms later). Keep it well below `ownership_expiry_secs`.
    pub balance_interval_secs: u64,
    /// How often checkpoints are written (each partition's, when it has moved).
    pub checkpoint_interval_ms: u64,
    /// Events of one partition being processed at once, at most (what `broker.prefetch` is for a
    /// queue): during a FHIR outage this many are held and reading the partition pauses.
    pub max_in_flight: usize,
    /// The event hub dead letters are sent to (same namespace and credentials), with the error in
    /// the application properties `x-iomt-error-kind` and `x-iomt-error`.
    pub dead_letter_hub: String,
}

impl Default for EventHubs {
    fn default() -> Self {
        EventHubs {
            connection_string: String::new(),
            auth: EventHubsAuth::ConnectionString,
            namespace: String::new(),
            hub: String::new(),
            consumer_group: "$Default".into(),
            tenant_id: String::new(),
            client_id: String::new(),
            client_secret: String::new(),
            authority_host: "https://login.microsoftonline.com".into(),
            custom_endpoint: String::new(),
            checkpoint_postgres_url: String::new(),
            start_position: "earliest".into(),
            instance_id: String::new(),
            ownership_expiry_secs: 30,
            balance_interval_secs: 5,
            checkpoint_interval_ms: 1000,
            max_in_flight: 5000,
            dead_letter_hub: String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventHubsAuth {
    #[default]
    ConnectionString,
    Entra,
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
    /// Serve the mapping debugger at `/debugger` (the running mappings; no data leaves the machine).
    #[serde(default)]
    pub debugger: bool,
    /// When set, the debugger asks for it (`Authorization: Bearer …` or `?token=…`).
    #[serde(default)]
    pub debugger_token: String,
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
    /// Every problem validation found, so that one edit fixes them all.
    #[error("{} configuration problems:\n{}", .0.len(), .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Several(Vec<ConfigError>),
}

impl ConfigError {
    fn from_problems(mut problems: Vec<ConfigError>) -> Result<(), ConfigError> {
        match problems.len() {
            0 => Ok(()),
            1 => Err(problems.remove(0)),
            _ => Err(ConfigError::Several(problems)),
        }
    }
}

/// Collects what validation finds wrong.
#[derive(Default)]
pub(crate) struct Problems(Vec<ConfigError>);

impl Problems {
    pub(crate) fn bad(&mut self, key: &str, message: impl Into<String>) {
        self.0.push(ConfigError::Invalid { key: key.to_string(), message: message.into() });
    }
}

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

impl Broker {
    fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Problems::default();
        self.check(&mut p);
        ConfigError::from_problems(p.0)
    }

    pub(crate) fn check(&self, p: &mut Problems) {
        if !self.url.starts_with("amqp://") && !self.url.starts_with("amqps://") {
            p.bad("broker.url", format!("'{}' is not an amqp:// or amqps:// URL", self.url));
        }
        if self.queue.trim().is_empty() {
            p.bad("broker.queue", "must name a queue");
        }
        if self.prefetch == 0 {
            p.bad("broker.prefetch", "must be at least 1");
        }
        if self.dead_letter_exchange.trim().is_empty() {
            p.bad("broker.dead_letter_exchange", "must name an exchange: nothing may be dropped silently");
        }
        if self.dead_letter_queue.trim().is_empty() {
            p.bad("broker.dead_letter_queue", "must name a queue: dead letters must be kept");
        }
        if self.topology == Topology::Sharded {
            if self.shard_queues == 0 {
                p.bad("broker.shard_queues", "must be at least 1");
            }
            if self.instances == 0 || self.instance >= self.instances {
                p.bad(
                    "broker.instance",
                    format!(
                        "{} is not an index below broker.instances ({}): instances are numbered 0 to instances - 1",
                        self.instance, self.instances
                    ),
                );
            }
        }
        if !self.management_url.is_empty() && reqwest::Url::parse(&self.management_url).is_err() {
            p.bad("broker.management_url", format!("'{}' is not a URL", self.management_url));
        }
    }
}

impl EventHubs {
    /// The hub: `hub`, or the connection string's `EntityPath`.
    pub fn hub_name(&self) -> String {
        if !self.hub.is_empty() {
            return self.hub.clone();
        }
        connection_string_part(&self.connection_string, "EntityPath").unwrap_or_default()
    }

    /// The fully qualified namespace: `namespace`, or the host of the connection string's `Endpoint`.
    pub fn namespace_host(&self) -> String {
        if !self.namespace.is_empty() {
            return self.namespace.clone();
        }
        let endpoint = connection_string_part(&self.connection_string, "Endpoint").unwrap_or_default();
        let host = endpoint.split_once("://").map_or(endpoint.as_str(), |(_, rest)| rest);
        host.trim_end_matches('/').to_string()
    }

    pub(crate) fn check(&self, p: &mut Problems) {
        match self.auth {
            EventHubsAuth::ConnectionString => {
                if self.connection_string.is_empty() {
                    p.bad("eventhubs.connection_string", "is required when eventhubs.auth = \"connection-string\"");
                } else {
                    for part in ["Endpoint", "SharedAccessKeyName", "SharedAccessKey"] {
                        if connection_string_part(&self.connection_string, part).is_none() {
                            p.bad(
                                "eventhubs.connection_string",
                                format!(
                                    "has no {part}=…; copy it from the hub's or namespace's Shared access policies"
                                ),
                            );
                        }
                    }
                }
            }
            EventHubsAuth::Entra => {
                for (key, v) in [
                    ("eventhubs.namespace", &self.namespace),
                    ("eventhubs.tenant_id", &self.tenant_id),
                    ("eventhubs.client_id", &self.client_id),
                    ("eventhubs.client_secret", &self.client_secret),
                ] {
                    if v.is_empty() {
                        p.bad(key, "is required when eventhubs.auth = \"entra\"");
                    }
                }
                if reqwest::Url::parse(&self.authority_host).is_err() {
                    p.bad("eventhubs.authority_host", format!("'{}' is not a URL", self.authority_host));
                }
            }
        }
        if self.hub_name().is_empty() {
            p.bad("eventhubs.hub", "must name the event hub (or give EntityPath= in eventhubs.connection_string)");
        }
        if self.consumer_group.is_empty() {
            p.bad("eventhubs.consumer_group", "must name a consumer group ($Default is the hub's own)");
        }
        let amqp = |u: &str| u.starts_with("amqp://") || u.starts_with("amqps://");
        if !self.custom_endpoint.is_empty() && !amqp(&self.custom_endpoint) {
            p.bad(
                "eventhubs.custom_endpoint",
                format!("'{}' is not an amqp:// or amqps:// address", self.custom_endpoint),
            );
        }
        if self.checkpoint_postgres_url.is_empty() {
            p.bad(
                "eventhubs.checkpoint_postgres_url",
                "is required: ownership and checkpoints are kept in PostgreSQL (e.g. host=127.0.0.1 user=postgres dbname=iomt)",
            );
        } else if self.checkpoint_postgres_url.parse::<tokio_postgres::Config>().is_err() {
            p.bad("eventhubs.checkpoint_postgres_url", "is not a PostgreSQL connection string");
        }
        if self.start_position().is_none() {
            p.bad(
                "eventhubs.start_position",
                format!("'{}' is not earliest, latest or an RFC 3339 time", self.start_position),
            );
        }
        if self.dead_letter_hub.is_empty() {
            p.bad(
                "eventhubs.dead_letter_hub",
                "must name the event hub dead letters go to: nothing may be dropped silently",
            );
        } else if self.dead_letter_hub == self.hub_name() {
            p.bad("eventhubs.dead_letter_hub", "must not be the hub the connector reads");
        }
        if self.ownership_expiry_secs < 2 * self.balance_interval_secs.max(1) {
            p.bad(
                "eventhubs.ownership_expiry_secs",
                format!(
                    "{} is less than twice eventhubs.balance_interval_secs ({}): owners would lose partitions between renewals",
                    self.ownership_expiry_secs, self.balance_interval_secs
                ),
            );
        }
        if self.balance_interval_secs == 0 {
            p.bad("eventhubs.balance_interval_secs", "must be at least 1");
        }
        if self.checkpoint_interval_ms == 0 {
            p.bad("eventhubs.checkpoint_interval_ms", "must be at least 1");
        }
        if self.max_in_flight == 0 {
            p.bad("eventhubs.max_in_flight", "must be at least 1");
        }
    }

    /// `start_position`, understood.
    pub fn start_position(&self) -> Option<StartAt> {
        match self.start_position.as_str() {
            "earliest" => Some(StartAt::Earliest),
            "latest" => Some(StartAt::Latest),
            t => chrono::DateTime::parse_from_rfc3339(t).ok().map(|t| StartAt::Enqueued(t.to_utc())),
        }
    }
}

/// Where a partition without a checkpoint starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StartAt {
    Earliest,
    Latest,
    Enqueued(chrono::DateTime<chrono::Utc>),
}

/// `Key=value` from a `;`-separated connection string (keys compared without case, as Azure does).
pub fn connection_string_part(cs: &str, key: &str) -> Option<String> {
    cs.split(';')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(key))
        .map(|(_, v)| v.trim().to_string())
}

impl Settings {
    /// Defaults, then `file` (if any), then `IOMT_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let s: Settings = Settings::figment(file)?.extract().map_err(load_error)?;
        s.validate()?;
        Ok(s)
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
        crate::source::check(self, &mut p);
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
