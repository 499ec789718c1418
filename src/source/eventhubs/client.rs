//! The SDK's clients, opened with the configured credentials.

use super::settings::{EventHubs, EventHubsAuth};
use super::{EventHubsError, hub_error, identity};
use azure_core::credentials::TokenCredential;
use azure_messaging_eventhubs::{ConsumerClient, ProducerClient};
use std::sync::Arc;

/// The connection string without `EntityPath`: the hub is always named separately, so that one
/// connection string serves the source hub and the dead-letter hub.
fn namespace_connection_string(cs: &str) -> String {
    cs.split(';')
        .filter(|kv| !kv.trim().is_empty() && !kv.trim().to_ascii_lowercase().starts_with("entitypath="))
        .collect::<Vec<_>>()
        .join(";")
}

/// The token credential of `auth = "entra"` or `"managed-identity"`.
fn signed_in(s: &EventHubs, hub: &str) -> Result<Arc<dyn TokenCredential>, EventHubsError> {
    identity::credential(s).ok_or_else(|| hub_error(hub, "eventhubs.auth names no token sign-in"))
}

/// A consumer of `hub` with the configured credentials.
pub async fn consumer(s: &EventHubs, hub: &str) -> Result<ConsumerClient, EventHubsError> {
    let mut b = ConsumerClient::builder().with_consumer_group(s.consumer_group.clone());
    if !s.custom_endpoint.is_empty() {
        b = b.with_custom_endpoint(s.custom_endpoint.clone());
    }
    let opened = match s.auth {
        EventHubsAuth::ConnectionString => {
            b.open_with_connection_string(&namespace_connection_string(&s.connection_string), Some(hub)).await
        }
        EventHubsAuth::Entra | EventHubsAuth::ManagedIdentity => {
            b.open(&s.namespace, hub.to_string(), signed_in(s, hub)?).await
        }
    };
    opened.map_err(|e| hub_error(hub, e))
}

/// A producer for `hub` (the dead-letter hub, or `publish`/`simulate`'s target).
pub async fn producer(s: &EventHubs, hub: &str) -> Result<ProducerClient, EventHubsError> {
    let mut b = ProducerClient::builder();
    if !s.custom_endpoint.is_empty() {
        b = b.with_custom_endpoint(s.custom_endpoint.clone());
    }
    let opened = match s.auth {
        EventHubsAuth::ConnectionString => {
            b.open_with_connection_string(&namespace_connection_string(&s.connection_string), Some(hub)).await
        }
        EventHubsAuth::Entra | EventHubsAuth::ManagedIdentity => b.open(&s.namespace, hub, signed_in(s, hub)?).await,
    };
    opened.map_err(|e| hub_error(hub, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_path_is_left_to_the_hub_setting() {
        let cs = "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=v;EntityPath=devices";
        assert_eq!(
            namespace_connection_string(cs),
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=v"
        );
    }
}
