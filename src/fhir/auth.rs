//! FHIR server authentication: none, a static bearer token, or OAuth2 client credentials with the
//! token refreshed before it expires (and after a 401).

use super::FhirError;
use crate::config::{self, AuthKind};
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone)]
pub enum TokenSource {
    None,
    Static(String),
    OAuth2(Arc<OAuth2>),
}

pub struct OAuth2 {
    http: reqwest::Client,
    token_url: String,
    client_id: String,
    client_secret: String,
    scope: String,
    cached: Mutex<Option<(String, Instant)>>,
}

/// A token is renewed this long before the server says it expires.
const EARLY: Duration = Duration::from_secs(60);

impl TokenSource {
    pub fn new(s: &config::Fhir, http: reqwest::Client) -> TokenSource {
        match s.auth {
            AuthKind::None => TokenSource::None,
            AuthKind::Bearer => TokenSource::Static(s.bearer_token.clone()),
            AuthKind::Oauth2 => TokenSource::OAuth2(Arc::new(OAuth2::client_credentials(
                http,
                s.oauth2_token_url.clone(),
                s.oauth2_client_id.clone(),
                s.oauth2_client_secret.clone(),
                s.oauth2_scope.clone(),
            ))),
        }
    }

    pub async fn token(&self) -> Result<Option<String>, FhirError> {
        match self {
            TokenSource::None => Ok(None),
            TokenSource::Static(t) => Ok(Some(t.clone())),
            TokenSource::OAuth2(o) => o.token().await.map(Some),
        }
    }

    /// Whether a refused token can be replaced by a fresh one (OAuth2).
    pub fn renews(&self) -> bool {
        matches!(self, TokenSource::OAuth2(_))
    }

    /// Forget a token the server refused.
    pub fn invalidate(&self) {
        if let TokenSource::OAuth2(o) = self
            && let Ok(mut c) = o.cached.lock()
        {
            *c = None;
        }
    }
}

impl std::fmt::Debug for OAuth2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuth2").field("token_url", &self.token_url).field("client_id", &self.client_id).finish()
    }
}

impl OAuth2 {
    /// A client-credentials token source (also Event Hubs' Microsoft Entra sign-in).
    pub fn client_credentials(
        http: reqwest::Client,
        token_url: String,
        client_id: String,
        client_secret: String,
        scope: String,
    ) -> OAuth2 {
        OAuth2 { http, token_url, client_id, client_secret, scope, cached: Mutex::new(None) }
    }

    /// A token and how long it is good for.
    pub async fn token_with_ttl(&self) -> Result<(String, Duration), FhirError> {
        let token = self.token().await?;
        let until = self.cached.lock().ok().and_then(|c| c.as_ref().map(|(_, u)| *u));
        Ok((token, until.map_or(Duration::from_secs(300), |u| u.saturating_duration_since(Instant::now()))))
    }

    async fn token(&self) -> Result<String, FhirError> {
        if let Ok(c) = self.cached.lock()
            && let Some((t, until)) = c.as_ref()
            && Instant::now() + EARLY < *until
        {
            return Ok(t.clone());
        }
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", &self.client_id),
            ("client_secret", &self.client_secret),
        ];
        if !self.scope.is_empty() {
            form.push(("scope", &self.scope));
        }
        let body: Vec<String> = form.iter().map(|(k, v)| format!("{k}={}", super::encode(v))).collect();
        let resp = self
            .http
            .post(&self.token_url)
            .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body.join("&"))
            .send()
            .await
            // Unreachable is transient, like the FHIR server itself being away: hold and retry.
            .map_err(|e| FhirError::Network {
                method: "POST",
                path: "(token endpoint)".into(),
                message: format!("token endpoint {} unreachable: {e}", self.token_url),
            })?;
        let status = resp.status();
        if super::transient_status(status.as_u16()) {
            // The login server is busy or away: as transient as the FHIR server being away.
            return Err(FhirError::Status {
                method: "POST",
                path: "(token endpoint)".into(),
                status: status.as_u16(),
                outcome: format!("token endpoint {} answered {status}", self.token_url),
                retry_after: None,
            });
        }
        let v: Value = resp.json().await.map_err(|e| {
            FhirError::Auth(format!("token endpoint {} answered {status} without JSON: {e}", self.token_url))
        })?;
        let Some(token) = v.get("access_token").and_then(Value::as_str) else {
            return Err(FhirError::Auth(format!(
                "token endpoint {} answered {status} without access_token: {v}",
                self.token_url
            )));
        };
        let ttl = v.get("expires_in").and_then(Value::as_u64).unwrap_or(300);
        if let Ok(mut c) = self.cached.lock() {
            *c = Some((token.to_string(), Instant::now() + Duration::from_secs(ttl)));
        }
        Ok(token.to_string())
    }
}
