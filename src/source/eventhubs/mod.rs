//! Azure Event Hubs (AMQP 1.0, Microsoft's `azure_messaging_eventhubs`): the evaluation envelope of
//! an event, partition ownership shared with the other instances of the consumer group, in-order
//! checkpoints, and dead letters sent to a dead-letter hub. No Event Hubs type leaves this module.
//!
//! Every instance runs one coordinator. Each balancing round it renews what it owns, then claims
//! at most one partition (`balance::next_claim`) in the checkpoint store (`store`: PostgreSQL, or
//! Azure Blob Storage in the layout Microsoft's own processors use and share, `blobstore`). For
//! each partition it owns, a reader opens a receiver with the ownership's version as its owner
//! level (epoch), so the service cuts off a previous owner that has not noticed yet. The reader hands events to the
//! pipeline, pauses when `max_in_flight` are unsettled (the held-messages rule of a FHIR outage),
//! and moves the checkpoint only past events that are persisted or dead-lettered (`book`).

mod balance;
mod blob;
mod blobstore;
mod book;
mod client;
mod context;
mod coordinator;
mod deadletters;
mod envelope;
mod identity;
mod publisher;
mod reader;
pub mod settings;
mod source;
pub mod store;

pub use client::{consumer, producer};
pub use coordinator::{Running, start};
pub use envelope::envelope;
pub use publisher::{HubPublisher, event};
pub use source::EventHubsSource;

pub const ERROR_KIND_PROPERTY: &str = "x-iomt-error-kind";
pub const ERROR_PROPERTY: &str = "x-iomt-error";
/// Where a dead letter was read: the hub, its partition and the event's sequence number there.
pub const SOURCE_HUB_PROPERTY: &str = "x-iomt-source-hub";
pub const SOURCE_PARTITION_PROPERTY: &str = "x-iomt-source-partition";
pub const SOURCE_SEQUENCE_PROPERTY: &str = "x-iomt-source-sequence-number";
/// The send time a sender may stamp (epoch milliseconds), as on RabbitMQ.
pub const SENT_AT_PROPERTY: &str = "x-iomt-sent-at";

/// What went wrong with the hub or the checkpoint store, in words naming the setting to check.
#[derive(Debug, thiserror::Error)]
pub enum EventHubsError {
    #[error("event hub {hub}: {message}")]
    Hub { hub: String, message: String },
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

fn hub_error(hub: &str, e: impl std::fmt::Display) -> EventHubsError {
    let mut message = e.to_string();
    // The SDK's error is text only, and it takes no CA setting: say where its trust comes from.
    if message.contains("invalid peer certificate") {
        message.push_str(
            "; the namespace's TLS certificate is not trusted: the Event Hubs client trusts the system's CA store, \
             or only SSL_CERT_FILE / SSL_CERT_DIR when set (docs/tls.md)",
        );
    }
    EventHubsError::Hub { hub: hub.to_string(), message }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_untrusted_certificate_says_where_the_client_takes_its_cas_from() {
        let e = super::hub_error("h", "AMQP Error: invalid peer certificate: UnknownIssuer").to_string();
        assert!(e.contains("UnknownIssuer") && e.contains("SSL_CERT_FILE"), "{e}");
        assert_eq!(super::hub_error("h", "link detached").to_string(), "event hub h: link detached");
    }
}
