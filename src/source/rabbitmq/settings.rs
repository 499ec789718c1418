//! The `[broker]` section: the RabbitMQ source's settings, checked by the source.

use crate::engine::Unmatched;
use crate::problems::redact;
use crate::problems::{ConfigError, Problems};
use serde::{Deserialize, Serialize};

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
    /// `amqps://`: a PEM file of the CA(s) that signed the broker's certificate, trusted in
    /// addition to the system's roots (lapin's verifier takes it as extra roots). Empty: the
    /// system's roots alone.
    #[serde(default)]
    pub tls_ca_file: String,
    /// `amqps://` with mutual TLS: this connector's certificate (PEM, leaf first) and its
    /// unencrypted private key (PEM). Both or neither.
    #[serde(default)]
    pub tls_cert_file: String,
    #[serde(default)]
    pub tls_key_file: String,
    /// MQTT topic filters (`devices/+/telemetry`, `wards/#`) whose publishes the connector reads:
    /// at declare, the queue (sharded: the consistent-hash exchange) is bound to `mqtt_exchange`
    /// with each filter as an AMQP binding key (`/` → `.`, `+` → `*`, `#` → `#`). Empty: no binding.
    #[serde(default)]
    pub mqtt_topics: Vec<String>,
    /// The exchange RabbitMQ's MQTT plugin publishes into (its `mqtt.exchange`, `amq.topic` by default).
    #[serde(default = "default_mqtt_exchange")]
    pub mqtt_exchange: String,
}

fn default_mqtt_exchange() -> String {
    "amq.topic".into()
}

/// An MQTT topic filter as the AMQP topic binding key RabbitMQ's MQTT plugin routes it by: levels
/// `/` become words `.`, `+` (one level) becomes `*`, `#` (the rest) stays `#`. RabbitMQ 3.10's
/// plugin turns every `/` of a topic into `.` and leaves a `.` as it is, so a `.` inside a level
/// splits it into two words there as here (`v1.2/+` is `v1.2.*`, which `v1.2/x` matches). `Err`
/// for a filter MQTT itself refuses.
pub fn mqtt_binding_key(filter: &str) -> Result<String, String> {
    if filter.is_empty() {
        return Err("an empty topic filter matches nothing".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let mut words = Vec::with_capacity(levels.len());
    for (i, level) in levels.iter().enumerate() {
        match *level {
            "+" => words.push("*".to_string()),
            "#" if i + 1 == levels.len() => words.push("#".to_string()),
            l if l.contains('#') || l.contains('+') => {
                return Err(format!(
                    "'{filter}': + and # must fill a whole level, and # must be the last (MQTT 3.1.1 section 4.7.1)"
                ));
            }
            l if l.contains('*') => {
                return Err(format!("'{filter}': * would be an AMQP wildcard; MQTT's one-level wildcard is +"));
            }
            l => words.push(l.to_string()),
        }
    }
    Ok(words.join("."))
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

impl Broker {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Problems::default();
        self.check(&mut p);
        ConfigError::from_problems(p.0)
    }

    pub(crate) fn check(&self, p: &mut Problems) {
        if !self.url.starts_with("amqp://") && !self.url.starts_with("amqps://") {
            let url = redact(&self.url);
            p.bad("broker.url", format!("'{url}' is not an amqp:// or amqps:// URL"));
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
        self.check_tls(p);
        for f in &self.mqtt_topics {
            if let Err(e) = mqtt_binding_key(f) {
                p.bad("broker.mqtt_topics", e);
            }
        }
        if !self.mqtt_topics.is_empty() && self.mqtt_exchange.trim().is_empty() {
            p.bad("broker.mqtt_exchange", "must name the exchange the MQTT plugin publishes to (amq.topic)");
        }
    }

    fn check_tls(&self, p: &mut Problems) {
        let (ca, cert, key) = (self.tls_ca_file.trim(), self.tls_cert_file.trim(), self.tls_key_file.trim());
        if ca.is_empty() && cert.is_empty() && key.is_empty() {
            return;
        }
        if cert.is_empty() != key.is_empty() {
            let (set, unset) = if cert.is_empty() {
                ("broker.tls_key_file", "broker.tls_cert_file")
            } else {
                ("broker.tls_cert_file", "broker.tls_key_file")
            };
            p.bad(
                unset,
                format!(
                    "{set} is set but {unset} is not: mutual TLS needs both the certificate and its key (or neither)"
                ),
            );
            return;
        }
        // Otherwise lapin would connect in the clear and never read the files.
        if !self.url.starts_with("amqps://") {
            let set = [("broker.tls_ca_file", ca), ("broker.tls_cert_file", cert)]
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, _)| *k)
                .collect::<Vec<_>>()
                .join(" and ");
            p.bad(
                "broker.url",
                format!("'{}' is not amqps://, but {set} is set: use amqps:// for TLS", redact(&self.url)),
            );
            return;
        }
        if let Err(e) = super::tls::load(self) {
            match e {
                super::tls::TlsError::File { key, .. } => p.bad(key, e.to_string()),
                _ => p.bad("broker.tls_ca_file", e.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(url: &str, ca: &str, cert: &str, key: &str) -> Broker {
        let mut b = crate::config::Settings::load_broker(None).unwrap_or_else(|e| panic!("{e}"));
        b.url = url.into();
        (b.tls_ca_file, b.tls_cert_file, b.tls_key_file) = (ca.into(), cert.into(), key.into());
        b
    }

    fn problem(b: &Broker) -> String {
        b.validate().err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn mqtt_filters_become_amqp_topic_binding_keys() {
        assert_eq!(mqtt_binding_key("devices/+/telemetry").as_deref(), Ok("devices.*.telemetry"));
        assert_eq!(mqtt_binding_key("wards/#").as_deref(), Ok("wards.#"));
        assert_eq!(mqtt_binding_key("#").as_deref(), Ok("#"));
        assert_eq!(mqtt_binding_key("v1.2/+/x").as_deref(), Ok("v1.2.*.x"));
        for bad in ["", "a/#/b", "a/b+", "a/*/b", "a#"] {
            assert!(mqtt_binding_key(bad).is_err(), "{bad}");
        }
        let mut b = broker("amqp://h/%2f", "", "", "");
        b.mqtt_topics = vec!["devices/#/x".into()];
        assert!(problem(&b).contains("configuration key broker.mqtt_topics:"), "{}", problem(&b));
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_the_key_its_certificate() {
        let e = problem(&broker("amqps://u:secret@h/%2f", "", "client.pem", ""));
        assert!(e.contains("configuration key broker.tls_key_file:") && e.contains("broker.tls_cert_file"), "{e}");
        let e = problem(&broker("amqps://u:secret@h/%2f", "", "", "client.key"));
        assert!(e.contains("configuration key broker.tls_cert_file:") && e.contains("broker.tls_key_file"), "{e}");
    }

    #[test]
    fn tls_files_with_a_plain_amqp_url_are_refused_without_showing_the_password() {
        let e = problem(&broker("amqp://u:secret@h/%2f", "ca.pem", "", ""));
        assert!(e.contains("configuration key broker.url:") && e.contains("broker.tls_ca_file"), "{e}");
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn a_missing_or_non_pem_ca_file_names_its_key() {
        let e = problem(&broker("amqps://h/%2f", "/nonexistent/ca.pem", "", ""));
        assert!(e.contains("configuration key broker.tls_ca_file:") && e.contains("cannot be read"), "{e}");
        let e = problem(&broker("amqps://h/%2f", "Cargo.toml", "", ""));
        assert!(e.contains("configuration key broker.tls_ca_file:") && e.contains("no PEM certificate"), "{e}");
    }
}
