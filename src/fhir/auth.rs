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
            AuthKind::Oauth2 => TokenSource::OAuth2(Arc::new(OAuth2 {
                http,
                token_url: s.oauth2_token_url.clone(),
                client_id: s.oauth2_client_id.clone(),
                client_secret: s.oauth2_client_secret.clone(),
                scope: s.oauth2_scope.clone(),
                cached: Mutex::new(None),
            })),
        }
    }

    pub async fn token(&self) -> Result<Option<String>, FhirError> {
        match self {
            TokenSource::None => Ok(None),
            TokenSource::Static(t) => Ok(Some(t.clone())),
            TokenSource::OAuth2(o) => o.token().await.map(Some),
        }
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

impl OAuth2 {
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
            .map_err(|e| FhirError::Auth(format!("token endpoint {} unreachable: {e}", self.token_url)))?;
        let status = resp.status();
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
