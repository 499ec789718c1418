//! The `[eventhubs]` section: the Event Hubs source's settings, checked by the source.

use crate::problems::Problems;
use crate::problems::redact;
use serde::{Deserialize, Serialize};

/// `source.kind = "eventhubs"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventHubs {
    /// `Endpoint=sb://NAMESPACE.servicebus.windows.net/;SharedAccessKeyName=…;SharedAccessKey=…;EntityPath=HUB`
    /// (the hub may be given as `hub` instead). For `auth = "connection-string"`.
    pub connection_string: String,
    /// `connection-string` (SAS), `entra` (Microsoft Entra client credentials) or
    /// `managed-identity` (the machine's managed identity). Entra and managed identity also sign in
    /// to the Blob checkpoint store when it has no `blob_connection_string`.
    pub auth: EventHubsAuth,
    /// The fully qualified namespace, e.g. `myns.servicebus.windows.net` (`auth = "entra"` or
    /// `"managed-identity"`). Also the first part of the checkpoint store's keys (else the
    /// connection string's host): set it to what a Microsoft processor sharing the store names.
    pub namespace: String,
    pub hub: String,
    pub consumer_group: String,
    /// `auth = "entra"`: the app registration's tenant, client id and secret.
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: String,
    /// Where Entra tokens come from; another authority (a sovereign cloud) may be set here.
    pub authority_host: String,
    /// `auth = "managed-identity"`: a user-assigned identity's client id; empty: the system-assigned one.
    pub managed_identity_client_id: String,
    /// `auth = "managed-identity"`: the instance metadata token endpoint. App Service and Container
    /// Apps set `IDENTITY_ENDPOINT` and `IDENTITY_HEADER`, which are used instead when present.
    pub imds_endpoint: String,
    /// Talk to this AMQP address instead of the namespace's (`amqp://host:port`: plain AMQP, as the
    /// Event Hubs emulator and the test peer speak; `amqps://` for a gateway).
    pub custom_endpoint: String,
    /// Where ownership and checkpoints live: `postgres` (`checkpoint_postgres_url`) or `blob` (Azure
    /// Blob Storage in the layout of the Azure SDKs' event processors: `blob_container` and
    /// `blob_connection_string` or `blob_url`).
    pub checkpoint_store: CheckpointStoreKind,
    /// `checkpoint_store = "postgres"`: a PostgreSQL connection string (`host=… user=… dbname=…` or a
    /// `postgres://` URL). Ownership and checkpoints of every instance of the consumer group live there.
    pub checkpoint_postgres_url: String,
    /// `checkpoint_store = "blob"`: the storage account's connection string (Shared Key:
    /// `AccountName=…;AccountKey=…` with `BlobEndpoint=` or `EndpointSuffix=`). Empty: `blob_url`
    /// with the hub's sign-in (`auth = "entra"` or `"managed-identity"`).
    pub blob_connection_string: String,
    /// `checkpoint_store = "blob"`: the account's blob endpoint, e.g.
    /// `https://myaccount.blob.core.windows.net`, signed in to as the hub is.
    pub blob_url: String,
    /// The container the checkpoints and ownership blobs are in (made if missing): the one the
    /// Azure SDK processor of the same consumer group uses, to share its checkpoints.
    pub blob_container: String,
    /// A PEM file of CAs the Blob endpoint's certificate may chain to, in addition to the
    /// system's (an emulator or a TLS-inspecting proxy).
    pub blob_ca_file: String,
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
            managed_identity_client_id: String::new(),
            imds_endpoint: IMDS_ENDPOINT.into(),
            custom_endpoint: String::new(),
            checkpoint_store: CheckpointStoreKind::Postgres,
            checkpoint_postgres_url: String::new(),
            blob_connection_string: String::new(),
            blob_url: String::new(),
            blob_container: String::new(),
            blob_ca_file: String::new(),
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
    ManagedIdentity,
}

/// Azure's instance metadata service: the managed identity token endpoint of a virtual machine,
/// scale set or AKS node.
pub const IMDS_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointStoreKind {
    #[default]
    Postgres,
    Blob,
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
        self.check_sign_in(p);
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
                format!("'{}' is not an amqp:// or amqps:// address", redact(&self.custom_endpoint)),
            );
        }
        self.check_store(p);
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

    /// The checkpoint store `checkpoint_store` names, and what it needs.
    fn check_store(&self, p: &mut Problems) {
        match self.checkpoint_store {
            CheckpointStoreKind::Postgres => {
                if self.checkpoint_postgres_url.is_empty() {
                    p.bad(
                        "eventhubs.checkpoint_postgres_url",
                        "is required: ownership and checkpoints are kept in PostgreSQL (e.g. host=127.0.0.1 user=postgres dbname=iomt), \
                         or set eventhubs.checkpoint_store = \"blob\"",
                    );
                } else if self.checkpoint_postgres_url.parse::<tokio_postgres::Config>().is_err() {
                    p.bad("eventhubs.checkpoint_postgres_url", "is not a PostgreSQL connection string");
                }
            }
            CheckpointStoreKind::Blob => self.check_blob(p),
        }
    }

    /// `checkpoint_store = "blob"`: a container, and an account reached by a key or by the hub's sign-in.
    fn check_blob(&self, p: &mut Problems) {
        if !valid_container(&self.blob_container) {
            p.bad(
                "eventhubs.blob_container",
                format!(
                    "'{}' is not a container name (3 to 63 lower-case letters, digits and single hyphens); \
                     it is required with eventhubs.checkpoint_store = \"blob\"",
                    self.blob_container
                ),
            );
        }
        if !self.blob_connection_string.is_empty() {
            if let Err(e) = super::blob::Account::from_connection_string(&self.blob_connection_string) {
                p.bad("eventhubs.blob_connection_string", e);
            }
        } else if self.blob_url.is_empty() {
            p.bad(
                "eventhubs.blob_connection_string",
                "or eventhubs.blob_url is required with eventhubs.checkpoint_store = \"blob\"",
            );
        } else if !(self.blob_url.starts_with("https://") || self.blob_url.starts_with("http://"))
            || reqwest::Url::parse(&self.blob_url).is_err()
        {
            p.bad("eventhubs.blob_url", format!("'{}' is not an http(s):// URL", redact(&self.blob_url)));
        } else if self.auth == EventHubsAuth::ConnectionString {
            p.bad(
                "eventhubs.blob_url",
                "is signed in to as the hub is, and eventhubs.auth = \"connection-string\" has no token: \
                 give eventhubs.blob_connection_string, or use auth = \"entra\" or \"managed-identity\"",
            );
        }
        if !self.blob_ca_file.is_empty() && super::blob::read_ca(&self.blob_ca_file).is_err() {
            p.bad(
                "eventhubs.blob_ca_file",
                format!("'{}' is not a readable PEM file with a certificate", self.blob_ca_file),
            );
        }
    }

    /// The credentials `auth` needs.
    fn check_sign_in(&self, p: &mut Problems) {
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
            EventHubsAuth::ManagedIdentity => {
                if self.namespace.is_empty() {
                    p.bad("eventhubs.namespace", "is required when eventhubs.auth = \"managed-identity\"");
                }
                if reqwest::Url::parse(&self.imds_endpoint).is_err() {
                    p.bad("eventhubs.imds_endpoint", format!("'{}' is not a URL", self.imds_endpoint));
                }
            }
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

/// A Blob Storage container name: 3 to 63 of `a-z0-9-`, starting and ending with a letter or
/// digit, no double hyphen.
fn valid_container(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// `Key=value` from a `;`-separated connection string (keys compared without case, as Azure does).
pub fn connection_string_part(cs: &str, key: &str) -> Option<String> {
    cs.split(';')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(key))
        .map(|(_, v)| v.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(s: &EventHubs) -> String {
        let mut p = Problems::default();
        s.check(&mut p);
        p.0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n")
    }

    #[test]
    fn the_blob_store_names_each_key_it_misses_and_hides_the_account_key() {
        let base = EventHubs {
            connection_string: "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=v"
                .into(),
            hub: "h".into(),
            dead_letter_hub: "d".into(),
            checkpoint_store: CheckpointStoreKind::Blob,
            ..Default::default()
        };
        let msg = problems(&base);
        assert!(msg.contains("eventhubs.blob_container"), "{msg}");
        assert!(msg.contains("eventhubs.blob_connection_string: or eventhubs.blob_url is required"), "{msg}");
        assert!(!msg.contains("checkpoint_postgres_url"), "PostgreSQL is not asked for: {msg}");

        let url_without_token = EventHubs {
            blob_url: "https://acct.blob.core.windows.net".into(),
            blob_container: "checkpoints".into(),
            ..base.clone()
        };
        assert!(problems(&url_without_token).contains("eventhubs.blob_url: is signed in to as the hub is"));
        let managed = EventHubs {
            auth: EventHubsAuth::ManagedIdentity,
            namespace: "ns.servicebus.windows.net".into(),
            ..url_without_token
        };
        assert_eq!(problems(&managed), "");

        let bad_key = EventHubs {
            blob_connection_string: "AccountName=acct;AccountKey=not base64!".into(),
            blob_container: "checkpoints".into(),
            blob_ca_file: "/nonexistent.pem".into(),
            ..base
        };
        let msg = problems(&bad_key);
        assert!(msg.contains("eventhubs.blob_connection_string: has an AccountKey that is not base64"), "{msg}");
        assert!(msg.contains("eventhubs.blob_ca_file"), "{msg}");
        assert!(!msg.contains("not base64!"), "the key itself is not shown: {msg}");
        assert_eq!(
            crate::problems::redact("AccountName=a;AccountKey=s3cret==;EndpointSuffix=x"),
            "AccountName=a;AccountKey=***;EndpointSuffix=x"
        );
    }
}
