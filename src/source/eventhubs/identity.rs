//! Token sign-in for the hub and the Blob checkpoint store: Microsoft Entra client credentials
//! (through the project's own OAuth2 client, the one the FHIR writer uses) and managed identity
//! (Azure's instance metadata endpoint, or App Service's and Container Apps' `IDENTITY_ENDPOINT`).
//! One credential serves every audience it is asked for (Event Hubs, Storage), a token cached per
//! audience.

use super::settings::{EventHubs, EventHubsAuth};
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The credential `auth` names; `None` for a connection string (SAS, signed by the SDK).
pub fn credential(s: &EventHubs) -> Option<Arc<dyn TokenCredential>> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap_or_default();
    match s.auth {
        EventHubsAuth::ConnectionString => None,
        EventHubsAuth::Entra => Some(Arc::new(Entra { s: s.clone(), http, by_scope: Mutex::new(HashMap::new()) })),
        EventHubsAuth::ManagedIdentity => Some(Arc::new(ManagedIdentity {
            endpoint: Endpoint::from_env(s),
            client_id: s.managed_identity_client_id.clone(),
            http,
            cached: Mutex::new(HashMap::new()),
        })),
    }
}

fn credential_error(message: String) -> azure_core::Error {
    azure_core::Error::with_message(azure_core::error::ErrorKind::Credential, message)
}

/// The scope the SDK asks for, or the hub's when it asks for none.
fn scope_of<'a>(scopes: &[&'a str]) -> &'a str {
    scopes.first().copied().unwrap_or("https://eventhubs.azure.net/.default")
}

/// A token valid for `ttl` from now, as the SDK takes it.
fn access_token(token: String, ttl: Duration) -> AccessToken {
    AccessToken::new(token, azure_core::time::OffsetDateTime::now_utc() + ttl)
}

/// Client credentials, one OAuth2 token source per scope asked for.
struct Entra {
    s: EventHubs,
    http: reqwest::Client,
    by_scope: Mutex<HashMap<String, Arc<crate::fhir::auth::OAuth2>>>,
}

impl std::fmt::Debug for Entra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entra").field("tenant_id", &self.s.tenant_id).field("client_id", &self.s.client_id).finish()
    }
}

impl Entra {
    fn source(&self, scope: &str) -> Arc<crate::fhir::auth::OAuth2> {
        let mut by = self.by_scope.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let s = &self.s;
        by.entry(scope.to_string())
            .or_insert_with(|| {
                let url = format!("{}/{}/oauth2/v2.0/token", s.authority_host.trim_end_matches('/'), s.tenant_id);
                Arc::new(crate::fhir::auth::OAuth2::client_credentials(
                    self.http.clone(),
                    url,
                    s.client_id.clone(),
                    s.client_secret.clone(),
                    scope.to_string(),
                ))
            })
            .clone()
    }
}

#[async_trait::async_trait]
impl TokenCredential for Entra {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let (token, ttl) =
            self.source(scope_of(scopes)).token_with_ttl().await.map_err(|e| credential_error(e.to_string()))?;
        Ok(access_token(token, ttl))
    }
}

/// Where managed identity tokens are asked for.
#[derive(Debug, Clone, PartialEq)]
enum Endpoint {
    /// App Service, Functions, Container Apps: `IDENTITY_ENDPOINT`, with `IDENTITY_HEADER` as
    /// `X-IDENTITY-HEADER` (api-version 2019-08-01).
    AppService { url: String, header: String },
    /// Virtual machines, scale sets, AKS: the instance metadata service, `Metadata: true`
    /// (api-version 2018-02-01).
    Imds { url: String },
}

impl Endpoint {
    /// App Service's variables when the platform set both, as the Azure SDKs choose; else IMDS.
    fn from_env(s: &EventHubs) -> Endpoint {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        match (var("IDENTITY_ENDPOINT"), var("IDENTITY_HEADER")) {
            (Some(url), Some(header)) => Endpoint::AppService { url, header },
            _ => Endpoint::Imds { url: s.imds_endpoint.clone() },
        }
    }

    fn url(&self) -> &str {
        match self {
            Endpoint::AppService { url, .. } | Endpoint::Imds { url } => url,
        }
    }
}

struct ManagedIdentity {
    endpoint: Endpoint,
    client_id: String,
    http: reqwest::Client,
    /// By resource: the token and when it stops being good.
    cached: Mutex<HashMap<String, (String, Instant)>>,
}

impl std::fmt::Debug for ManagedIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedIdentity").field("endpoint", &self.endpoint.url()).finish()
    }
}

/// A token is asked for again this long before it expires.
const EARLY: Duration = Duration::from_secs(300);

impl ManagedIdentity {
    async fn token(&self, resource: &str) -> Result<(String, Duration), String> {
        if let Ok(c) = self.cached.lock()
            && let Some((t, until)) = c.get(resource)
            && Instant::now() + EARLY < *until
        {
            return Ok((t.clone(), until.saturating_duration_since(Instant::now())));
        }
        let version = match self.endpoint {
            Endpoint::AppService { .. } => "2019-08-01",
            Endpoint::Imds { .. } => "2018-02-01",
        };
        let mut url =
            format!("{}?api-version={version}&resource={}", self.endpoint.url(), crate::fhir::encode(resource));
        if !self.client_id.is_empty() {
            url.push_str(&format!("&client_id={}", crate::fhir::encode(&self.client_id)));
        }
        let request = match &self.endpoint {
            Endpoint::AppService { header, .. } => self.http.get(&url).header("X-IDENTITY-HEADER", header.as_str()),
            Endpoint::Imds { .. } => self.http.get(&url).header("Metadata", "true"),
        };
        let url = self.endpoint.url();
        let resp = request.send().await.map_err(|e| {
            format!("managed identity endpoint {url} unreachable (is this an Azure host with a managed identity?): {e}")
        })?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(format!("managed identity endpoint {url} answered {status}: {}", body.trim()));
        }
        let (token, ttl) = parse_token(&body).ok_or_else(|| {
            format!("managed identity endpoint {url} answered {status} without access_token and expiry")
        })?;
        if let Ok(mut c) = self.cached.lock() {
            c.insert(resource.to_string(), (token.clone(), Instant::now() + ttl));
        }
        Ok((token, ttl))
    }
}

/// `access_token` and how long it is good for: `expires_in` (seconds; IMDS sends it as text), else
/// `expires_on` (Unix seconds, as text or a number, as App Service sends it).
fn parse_token(body: &str) -> Option<(String, Duration)> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let token = v.get("access_token")?.as_str()?.to_string();
    let number = |k: &str| {
        let f = v.get(k)?;
        f.as_i64().or_else(|| f.as_str()?.trim().parse().ok())
    };
    let secs = match number("expires_in") {
        Some(n) => n,
        None => number("expires_on")? - chrono::Utc::now().timestamp(),
    };
    Some((token, Duration::from_secs(secs.max(0) as u64)))
}

#[async_trait::async_trait]
impl TokenCredential for ManagedIdentity {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        // Managed identity endpoints take a resource, not a scope.
        let scope = scope_of(scopes);
        let resource = scope.strip_suffix("/.default").unwrap_or(scope);
        let (token, ttl) = self.token(resource).await.map_err(credential_error)?;
        Ok(access_token(token, ttl))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imds_and_app_service_answers_give_a_token_and_its_lifetime() {
        let imds = r#"{"access_token":"t1","expires_in":"3599","expires_on":"1","resource":"https://storage.azure.com","token_type":"Bearer"}"#;
        assert_eq!(parse_token(imds), Some(("t1".into(), Duration::from_secs(3599))));
        let on = chrono::Utc::now().timestamp() + 600;
        let app = format!(r#"{{"access_token":"t2","expires_on":"{on}","resource":"r","token_type":"Bearer"}}"#);
        let (t, ttl) = parse_token(&app).unwrap_or_default();
        assert_eq!(t, "t2");
        assert!(ttl > Duration::from_secs(590) && ttl <= Duration::from_secs(600), "{ttl:?}");
        assert_eq!(parse_token(r#"{"error":"invalid_request"}"#), None);
    }
}
