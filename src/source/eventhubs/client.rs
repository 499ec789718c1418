//! The SDK's clients, opened with the configured credentials.

use super::settings::{EventHubs, EventHubsAuth};
use super::{EventHubsError, hub_error};
use azure_messaging_eventhubs::{ConsumerClient, ProducerClient};

/// The connection string without `EntityPath`: the hub is always named separately, so that one
/// connection string serves the source hub and the dead-letter hub.
fn namespace_connection_string(cs: &str) -> String {
    cs.split(';')
        .filter(|kv| !kv.trim().is_empty() && !kv.trim().to_ascii_lowercase().starts_with("entitypath="))
        .collect::<Vec<_>>()
        .join(";")
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
        EventHubsAuth::Entra => b.open(&s.namespace, hub.to_string(), entra::credential(s)).await,
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
        EventHubsAuth::Entra => b.open(&s.namespace, hub, entra::credential(s)).await,
    };
    opened.map_err(|e| hub_error(hub, e))
}

mod entra {
    //! Microsoft Entra client credentials through the project's own OAuth2 client (the one the FHIR
    //! writer uses): one token cache and one retry rule for both.
    use crate::source::eventhubs::settings::EventHubs;
    use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
    use std::sync::Arc;

    #[derive(Debug)]
    struct Entra(Arc<crate::fhir::auth::OAuth2>);

    pub fn credential(s: &EventHubs) -> Arc<dyn TokenCredential> {
        let url = format!("{}/{}/oauth2/v2.0/token", s.authority_host.trim_end_matches('/'), s.tenant_id);
        let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30)).build().unwrap_or_default();
        let scope = "https://eventhubs.azure.net/.default";
        Arc::new(Entra(Arc::new(crate::fhir::auth::OAuth2::client_credentials(
            http,
            url,
            s.client_id.clone(),
            s.client_secret.clone(),
            scope.into(),
        ))))
    }

    #[async_trait::async_trait]
    impl TokenCredential for Entra {
        async fn get_token(
            &self,
            _scopes: &[&str],
            _options: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            let (token, ttl) = self.0.token_with_ttl().await.map_err(|e| {
                azure_core::Error::with_message(azure_core::error::ErrorKind::Credential, e.to_string())
            })?;
            let expires = azure_core::time::OffsetDateTime::now_utc() + ttl;
            Ok(AccessToken::new(token, expires))
        }
    }
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
