//! A small Azure Blob Storage client on reqwest: only what the checkpoint store needs (create the
//! container, list blobs with their metadata, read one blob's properties, put an empty block blob
//! with metadata, set metadata), each conditioned by ETag where asked. Signed with the account key
//! (Shared Key) or a bearer token (Microsoft Entra, managed identity). Microsoft's own crates need a
//! stable `azure_core` the Event Hubs SDK's pins exclude (ARCHITECTURE.md).

use azure_core::credentials::TokenCredential;
use base64::Engine;
use hmac::{Hmac, Mac};
use reqwest::{Method, StatusCode, header::HeaderMap};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The REST version asked for: Azurite and every Azure region take it.
const VERSION: &str = "2023-11-03";
/// The token audience of Azure Storage.
pub const STORAGE_SCOPE: &str = "https://storage.azure.com/.default";
/// Azurite's (and the older emulator's) well-known development account.
const DEV_ACCOUNT: &str = "devstoreaccount1";
const DEV_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A storage account's blob endpoint and, from a connection string, its key.
#[derive(Clone)]
pub struct Account {
    /// `https://acct.blob.core.windows.net`, or Azurite's `http://127.0.0.1:10000/devstoreaccount1`.
    pub endpoint: String,
    pub name: String,
    key: Option<Vec<u8>>,
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account").field("endpoint", &self.endpoint).field("name", &self.name).finish()
    }
}

impl Account {
    /// `AccountName=…;AccountKey=…` with `BlobEndpoint=…` or `DefaultEndpointsProtocol` and
    /// `EndpointSuffix`; or `UseDevelopmentStorage=true` (Azurite on 127.0.0.1:10000).
    pub fn from_connection_string(cs: &str) -> Result<Account, String> {
        let part = |k: &str| super::settings::connection_string_part(cs, k).filter(|v| !v.is_empty());
        if part("UseDevelopmentStorage").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            let key = base64::engine::general_purpose::STANDARD.decode(DEV_KEY).map_err(|e| e.to_string())?;
            let endpoint = format!("http://127.0.0.1:10000/{DEV_ACCOUNT}");
            return Ok(Account { endpoint, name: DEV_ACCOUNT.into(), key: Some(key) });
        }
        let name = part("AccountName").ok_or("has no AccountName=…")?;
        let key = part("AccountKey").ok_or("has no AccountKey=… (copy it from the account's Access keys)")?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(&key)
            .map_err(|_| "has an AccountKey that is not base64".to_string())?;
        let endpoint = match part("BlobEndpoint") {
            Some(e) => e.trim_end_matches('/').to_string(),
            None => {
                let protocol = part("DefaultEndpointsProtocol").unwrap_or_else(|| "https".into());
                let suffix = part("EndpointSuffix").unwrap_or_else(|| "core.windows.net".into());
                format!("{protocol}://{name}.blob.{suffix}")
            }
        };
        if reqwest::Url::parse(&endpoint).is_err() {
            return Err(format!("has a BlobEndpoint that is not a URL: '{endpoint}'"));
        }
        Ok(Account { endpoint, name, key: Some(key) })
    }

    /// A blob endpoint signed in to with tokens: the account is the URL's first host label, or,
    /// for an emulator's `http://host:port/account`, its first path segment.
    pub fn from_url(url: &str) -> Account {
        let endpoint = url.trim_end_matches('/').to_string();
        let parsed = reqwest::Url::parse(&endpoint).ok();
        let in_path =
            parsed.as_ref().and_then(|u| u.path_segments()?.next().filter(|s| !s.is_empty()).map(String::from));
        let in_host = parsed.as_ref().and_then(|u| u.host_str()?.split('.').next().map(String::from));
        Account { endpoint, name: in_path.or(in_host).unwrap_or_default(), key: None }
    }
}

/// Reads a PEM bundle of CA certificates.
pub fn read_ca(path: &str) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("{path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{path}: no certificate"));
    }
    Ok(certs)
}

/// A failed request, in words: the operation, the blob and what the service said.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct BlobError {
    pub what: String,
    pub status: Option<u16>,
    pub message: String,
}

/// One blob as listed or read: its name, ETag, last change (by the service's clock), the
/// service's clock at the answer, and metadata.
#[derive(Debug, Clone, Default)]
pub struct BlobItem {
    pub name: String,
    pub etag: String,
    pub last_modified: Option<chrono::DateTime<chrono::Utc>>,
    pub now: Option<chrono::DateTime<chrono::Utc>>,
    pub metadata: BTreeMap<String, String>,
}

/// A write's precondition.
#[derive(Debug, Clone)]
pub enum Condition {
    /// Only if the blob does not exist yet.
    Absent,
    /// Only if the blob is still at this ETag.
    Matches(String),
}

#[derive(Clone)]
pub struct Container {
    http: reqwest::Client,
    account: Account,
    container: String,
    token: Option<Arc<dyn TokenCredential>>,
}

impl Container {
    pub fn new(
        account: Account,
        container: &str,
        token: Option<Arc<dyn TokenCredential>>,
        ca_file: &str,
    ) -> Result<Container, String> {
        let mut b = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if !ca_file.is_empty() {
            b = b.tls_certs_merge(read_ca(ca_file)?);
        }
        let http = b.build().map_err(|e| e.to_string())?;
        Ok(Container { http, account, container: container.to_string(), token })
    }

    /// Where the container is, for errors.
    pub fn describe(&self) -> String {
        format!("{}/{}", self.account.endpoint, self.container)
    }

    /// Makes the container unless it exists.
    pub async fn create(&self) -> Result<(), BlobError> {
        let r = self.send(Method::PUT, "", &[("restype", "container")], HeaderMap::new(), "create the container").await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.status == Some(409) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every blob whose name starts with `prefix`, with its metadata.
    pub async fn list(&self, prefix: &str) -> Result<Vec<BlobItem>, BlobError> {
        let mut out = Vec::new();
        let mut marker = String::new();
        loop {
            let mut q = vec![("restype", "container"), ("comp", "list"), ("include", "metadata"), ("prefix", prefix)];
            if !marker.is_empty() {
                q.push(("marker", &marker));
            }
            let what = format!("list {prefix}");
            let (headers, body) = self.send(Method::GET, "", &q, HeaderMap::new(), &what).await?;
            let now = header_time(&headers, "date");
            let (mut items, next) = parse_list(&body);
            items.iter_mut().for_each(|i| i.now = now);
            out.extend(items);
            match next {
                Some(n) if !n.is_empty() => marker = n,
                _ => return Ok(out),
            }
        }
    }

    /// One blob's properties and metadata; `None` when it does not exist.
    pub async fn properties(&self, blob: &str) -> Result<Option<BlobItem>, BlobError> {
        match self.send(Method::HEAD, blob, &[], HeaderMap::new(), &format!("read {blob}")).await {
            Ok((h, _)) => Ok(Some(item_from_headers(blob, &h))),
            Err(e) if e.status == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes an empty block blob with `metadata`; its new ETag. `Ok(None)` when `condition` failed.
    pub async fn put(
        &self,
        blob: &str,
        metadata: &[(&str, &str)],
        condition: Condition,
    ) -> Result<Option<BlobItem>, BlobError> {
        let mut h = meta_headers(metadata);
        h.insert("x-ms-blob-type", "BlockBlob".parse().expect("header value"));
        self.conditional(Method::PUT, blob, &[], h, condition, &format!("write {blob}")).await
    }

    /// Replaces an existing blob's metadata; its new ETag. `Ok(None)` when `condition` failed or
    /// the blob does not exist.
    pub async fn set_metadata(
        &self,
        blob: &str,
        metadata: &[(&str, &str)],
        condition: Condition,
    ) -> Result<Option<BlobItem>, BlobError> {
        let h = meta_headers(metadata);
        let what = format!("set the metadata of {blob}");
        self.conditional(Method::PUT, blob, &[("comp", "metadata")], h, condition, &what).await
    }

    async fn conditional(
        &self,
        method: Method,
        blob: &str,
        query: &[(&str, &str)],
        mut h: HeaderMap,
        condition: Condition,
        what: &str,
    ) -> Result<Option<BlobItem>, BlobError> {
        match &condition {
            Condition::Absent => {
                h.insert("if-none-match", "*".parse().expect("header value"));
            }
            Condition::Matches(etag) => {
                let v = etag.parse().map_err(|_| err(what, None, format!("ETag {etag} is not a header value")))?;
                h.insert("if-match", v);
            }
        }
        match self.send(method, blob, query, h, what).await {
            Ok((headers, _)) => Ok(Some(item_from_headers(blob, &headers))),
            // 412: changed since; 409 BlobAlreadyExists: made since; 404: no blob to set.
            Err(e) if matches!(e.status, Some(412 | 409 | 404)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends one signed request; the answer's headers and body, or the service's error.
    async fn send(
        &self,
        method: Method,
        blob: &str,
        query: &[(&str, &str)],
        mut headers: HeaderMap,
        what: &str,
    ) -> Result<(HeaderMap, String), BlobError> {
        let path = format!("{}{}{}", url_path(&self.account.endpoint), self.container, encoded_blob(blob));
        let base = self.account.endpoint.split_once("://").map_or("", |(scheme, rest)| {
            let host = rest.split('/').next().unwrap_or("");
            &self.account.endpoint[..scheme.len() + 3 + host.len()]
        });
        let qs: Vec<String> = query.iter().map(|(k, v)| format!("{k}={}", crate::fhir::encode(v))).collect();
        let url = if qs.is_empty() { format!("{base}{path}") } else { format!("{base}{path}?{}", qs.join("&")) };
        let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
        headers.insert("x-ms-date", date.parse().expect("header value"));
        headers.insert("x-ms-version", VERSION.parse().expect("header value"));
        // No request has a body; Shared Key signs a zero Content-Length as empty.
        let auth = self.authorization(&method, &path, query, &headers, "").await.map_err(|m| err(what, None, m))?;
        headers.insert("authorization", auth.parse().map_err(|_| err(what, None, "an unusable token".into()))?);
        let mut request = self.http.request(method.clone(), &url).headers(headers);
        if method == Method::PUT {
            // The service wants a PUT's length, even of nothing; hyper sends none for an empty body.
            request = request.header("content-length", "0").body(Vec::<u8>::new());
        }
        let resp = request
            .send()
            .await
            .map_err(|e| err(what, None, format!("{} unreachable: {}", self.account.endpoint, error_chain(&e))))?;
        let status = resp.status();
        let h = resp.headers().clone();
        let body = resp.text().await.unwrap_or_default();
        if status.is_success() {
            return Ok((h, body));
        }
        Err(err(what, Some(status.as_u16()), service_error(status, &h, &body)))
    }

    /// The `Authorization` header: Shared Key with the account key, else a bearer token.
    async fn authorization(
        &self,
        method: &Method,
        path: &str,
        query: &[(&str, &str)],
        headers: &HeaderMap,
        length: &str,
    ) -> Result<String, String> {
        if let Some(key) = &self.account.key {
            let to_sign = string_to_sign(&self.account.name, method, path, query, headers, length);
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).map_err(|e| e.to_string())?;
            mac.update(to_sign.as_bytes());
            let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
            return Ok(format!("SharedKey {}:{sig}", self.account.name));
        }
        let Some(token) = &self.token else {
            return Err("no account key and no sign-in for the Blob store".into());
        };
        let t =
            token.get_token(&[STORAGE_SCOPE], None).await.map_err(|e| format!("sign-in for the Blob store: {e}"))?;
        Ok(format!("Bearer {}", t.token.secret()))
    }
}

fn err(what: &str, status: Option<u16>, message: String) -> BlobError {
    BlobError { what: what.to_string(), status, message }
}

/// An error with its causes (reqwest's own text hides a refused certificate behind "error sending request").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The service's status and its error code (`x-ms-error-code`, or `<Code>` in the body).
fn service_error(status: StatusCode, h: &HeaderMap, body: &str) -> String {
    let code = h
        .get("x-ms-error-code")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
        .or_else(|| tag(body, "Code").map(unescape))
        .unwrap_or_default();
    let message = tag(body, "Message").map(unescape).unwrap_or_default();
    let message = message.lines().next().unwrap_or("");
    format!("{status} {code} {message}").trim().to_string()
}

/// The endpoint's path (`/devstoreaccount1` for an emulator, empty for an account host) and `/`.
fn url_path(endpoint: &str) -> String {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    let path = rest.find('/').map_or("", |i| &rest[i..]);
    format!("{}/", path.trim_end_matches('/'))
}

/// `/name` with each segment percent-encoded (names hold `$`, `:` and the like), or nothing.
fn encoded_blob(blob: &str) -> String {
    if blob.is_empty() {
        return String::new();
    }
    let segments: Vec<String> = blob.split('/').map(crate::fhir::encode).collect();
    format!("/{}", segments.join("/"))
}

fn meta_headers(metadata: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in metadata {
        if let (Ok(name), Ok(value)) =
            (reqwest::header::HeaderName::try_from(format!("x-ms-meta-{k}")), reqwest::header::HeaderValue::from_str(v))
        {
            h.insert(name, value);
        }
    }
    h
}

/// Shared Key's string to sign (Blob service, version 2015-02-21 and later).
fn string_to_sign(
    account: &str,
    method: &Method,
    path: &str,
    query: &[(&str, &str)],
    headers: &HeaderMap,
    length: &str,
) -> String {
    let get = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let mut ms: Vec<(String, String)> = headers
        .iter()
        .filter(|(k, _)| k.as_str().starts_with("x-ms-"))
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").trim().to_string()))
        .collect();
    ms.sort();
    let canonical_headers: String = ms.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let mut q: Vec<(String, &str)> = query.iter().map(|(k, v)| (k.to_ascii_lowercase(), *v)).collect();
    q.sort();
    let canonical_query: String = q.iter().map(|(k, v)| format!("\n{k}:{v}")).collect();
    let fields = [
        method.as_str().to_string(),
        get("content-encoding"),
        get("content-language"),
        length.to_string(),
        get("content-md5"),
        get("content-type"),
        String::new(),
        get("if-modified-since"),
        get("if-match"),
        get("if-none-match"),
        get("if-unmodified-since"),
        get("range"),
    ];
    format!("{}\n{canonical_headers}/{account}{path}{canonical_query}", fields.join("\n"))
}

fn header_time(h: &HeaderMap, name: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let v = h.get(name)?.to_str().ok()?;
    chrono::DateTime::parse_from_rfc2822(v).ok().map(|t| t.to_utc())
}

fn item_from_headers(blob: &str, h: &HeaderMap) -> BlobItem {
    let metadata = h
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().strip_prefix("x-ms-meta-")?.to_string(), v.to_str().ok()?.to_string())))
        .collect();
    BlobItem {
        name: blob.to_string(),
        etag: h.get("etag").and_then(|v| v.to_str().ok()).unwrap_or("").to_string(),
        last_modified: header_time(h, "last-modified"),
        now: header_time(h, "date"),
        metadata,
    }
}

/// The blobs of a List Blobs answer, and its `NextMarker`. The answer's shape is fixed and small
/// (names, two properties, metadata), so a few tag searches read it.
fn parse_list(xml: &str) -> (Vec<BlobItem>, Option<String>) {
    let mut items = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find("<Blob>") {
        let end = rest[start..].find("</Blob>").map_or(rest.len(), |e| start + e);
        let blob = &rest[start..end];
        let metadata = tag(blob, "Metadata").map(children).unwrap_or_default();
        items.push(BlobItem {
            name: tag(blob, "Name").map(unescape).unwrap_or_default(),
            etag: tag(blob, "Etag").map(unescape).unwrap_or_default(),
            last_modified: tag(blob, "Last-Modified")
                .and_then(|t| chrono::DateTime::parse_from_rfc2822(t).ok())
                .map(|t| t.to_utc()),
            now: None,
            metadata,
        });
        rest = &rest[end..];
    }
    (items, tag(xml, "NextMarker").map(unescape))
}

/// The text inside the first `<name>…</name>` (or `None` for `<name/>` and no such element).
fn tag<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&close)? + start;
    Some(&xml[start..end])
}

/// `<k>v</k>` children, as metadata (names lower-cased: the SDKs write them so).
fn children(xml: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = xml;
    while let Some(lt) = rest.find('<') {
        let Some(gt) = rest[lt..].find('>').map(|g| lt + g) else { break };
        let name = &rest[lt + 1..gt];
        if name.starts_with('/') || name.ends_with('/') {
            rest = &rest[gt + 1..];
            continue;
        }
        let close = format!("</{name}>");
        let Some(end) = rest[gt + 1..].find(&close).map(|e| gt + 1 + e) else { break };
        out.insert(name.to_ascii_lowercase(), unescape(&rest[gt + 1..end]));
        rest = &rest[end + close.len()..];
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&apos;", "'").replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_name_the_endpoint_and_account() {
        let a = Account::from_connection_string("UseDevelopmentStorage=true").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((a.endpoint.as_str(), a.name.as_str()), ("http://127.0.0.1:10000/devstoreaccount1", DEV_ACCOUNT));
        let a = Account::from_connection_string(
            "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;EndpointSuffix=core.windows.net",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.endpoint, "https://acct.blob.core.windows.net");
        let e = Account::from_connection_string("AccountName=acct").err().unwrap_or_default();
        assert!(e.contains("AccountKey"), "{e}");
        assert_eq!(Account::from_url("https://acct.blob.core.windows.net/").name, "acct");
        assert_eq!(Account::from_url("https://127.0.0.1:10100/devstoreaccount1").name, DEV_ACCOUNT);
    }

    /// The example of Microsoft's Shared Key documentation, in the emulator's path style.
    #[test]
    fn the_string_to_sign_has_the_canonical_headers_and_resource() {
        let mut h = HeaderMap::new();
        h.insert("x-ms-date", "Fri, 26 Jun 2015 23:39:12 GMT".parse().expect("v"));
        h.insert("x-ms-version", "2015-02-21".parse().expect("v"));
        h.insert("if-match", "\"0x1\"".parse().expect("v"));
        let s = string_to_sign(
            "devstoreaccount1",
            &Method::PUT,
            "/devstoreaccount1/c/a%24b",
            &[("comp", "metadata")],
            &h,
            "",
        );
        assert_eq!(
            s,
            "PUT\n\n\n\n\n\n\n\n\"0x1\"\n\n\n\nx-ms-date:Fri, 26 Jun 2015 23:39:12 GMT\nx-ms-version:2015-02-21\n/devstoreaccount1/devstoreaccount1/c/a%24b\ncomp:metadata"
        );
    }

    #[test]
    fn a_listing_gives_names_etags_times_and_metadata() {
        let xml = r#"<?xml version="1.0" encoding="utf-8"?><EnumerationResults ServiceEndpoint="x" ContainerName="c"><Prefix>p/</Prefix><Blobs><Blob><Name>ns/h/$default/ownership/0</Name><Properties><Last-Modified>Tue, 02 Jun 2026 10:00:00 GMT</Last-Modified><Etag>"0x8D"</Etag></Properties><Metadata><ownerid>a&amp;b</ownerid><ownerlevel>3</ownerlevel></Metadata></Blob><Blob><Name>ns/h/$default/ownership/1</Name><Properties><Etag>0x9</Etag></Properties><Metadata/></Blob></Blobs><NextMarker/></EnumerationResults>"#;
        let (items, next) = parse_list(xml);
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].name, "ns/h/$default/ownership/0");
        assert_eq!(items[0].etag, "\"0x8D\"");
        assert_eq!(items[0].metadata.get("ownerid").map(String::as_str), Some("a&b"));
        assert!(items[0].last_modified.is_some());
        assert!(items[1].metadata.is_empty());
        assert_eq!(next, None);
    }
}
