//! TLS to RabbitMQ (`amqps://`): the CA and client certificate of `[broker]`, the one way this
//! source opens a connection, and a refused handshake told in terms of the keys to fix.
//!
//! lapin's rustls verifies with the platform verifier; the CA of `broker.tls_ca_file` is passed
//! to it as an extra root, so it is trusted in addition to the system's roots, not instead of them.

use super::BrokerError;
use super::settings::Broker;
use crate::problems::redact;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Connection, ConnectionProperties, DefaultConnectionBuilder};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS to the broker could not be set up or was refused. Each names the key to fix and the
/// broker (its address redacted).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file named by a `broker.tls_*` key cannot be used.
    #[error("{key} = '{path}': {problem}")]
    File { key: &'static str, path: String, problem: String },
    /// The broker's certificate was not accepted.
    #[error("TLS to the broker at {url}: {advice} ({detail})")]
    ServerCertificate { url: String, advice: String, detail: String },
    /// The broker refused the connection during or right after the handshake: it wants a client
    /// certificate, or not the one it was given.
    #[error("TLS to the broker at {url}: {advice} ({detail})")]
    ClientCertificate { url: String, advice: String, detail: String },
}

/// The files of `[broker]`'s TLS keys, read and parsed; `Ok(None)` when none is set.
pub(crate) fn load(b: &Broker) -> Result<Option<OwnedTLSConfig>, TlsError> {
    let (ca, cert, key) = (b.tls_ca_file.trim(), b.tls_cert_file.trim(), b.tls_key_file.trim());
    if ca.is_empty() && cert.is_empty() && key.is_empty() {
        return Ok(None);
    }
    let mut config = OwnedTLSConfig::default();
    if !ca.is_empty() {
        let pem = read("broker.tls_ca_file", ca)?;
        certificates("broker.tls_ca_file", ca, &pem)?;
        // lapin parses it again from text; what was checked here is what it gets.
        let text = String::from_utf8(pem).map_err(|_| TlsError::File {
            key: "broker.tls_ca_file",
            path: ca.to_string(),
            problem: "is not PEM text".into(),
        })?;
        config.cert_chain = Some(text);
    }
    // Both or neither is a settings check; here a half pair is simply not a client identity.
    if !cert.is_empty() && !key.is_empty() {
        let pem = read("broker.tls_cert_file", cert)?;
        certificates("broker.tls_cert_file", cert, &pem)?;
        let key_pem = read("broker.tls_key_file", key)?;
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::File {
            key: "broker.tls_key_file",
            path: key.to_string(),
            problem: format!("holds no unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
        })?;
        config.identity = Some(OwnedIdentity::PKCS8 { pem, key: key_pem });
    }
    Ok(Some(config))
}

fn read(key: &'static str, path: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        key,
        path: path.to_string(),
        problem: format!("cannot be read: {e}"),
    })
}

fn certificates(key: &'static str, path: &str, pem: &[u8]) -> Result<(), TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| TlsError::File {
        key,
        path: path.to_string(),
        problem: format!("is not a PEM certificate file: {e}"),
    })?;
    if certs.is_empty() {
        return Err(TlsError::File { key, path: path.to_string(), problem: "holds no PEM certificate".into() });
    }
    Ok(())
}

/// Opens a connection to `broker.url` with the TLS settings of `[broker]`. Every connection of
/// this source (consumer, dead letters, publisher) goes through here.
pub(crate) async fn connect(b: &Broker, props: ConnectionProperties) -> Result<Connection, BrokerError> {
    let tls = load(b)?;
    let mut builder = DefaultConnectionBuilder::new()?.with_uri_str(b.url.clone()).with_properties(props);
    if let Some(tls) = tls {
        builder = builder.with_tls_config(tls);
    }
    builder.connect().await.map_err(|e| match explain(b, &e) {
        Some(tls) => BrokerError::Tls(tls),
        None => BrokerError::Amqp(e),
    })
}

/// A TLS failure in `e`, in terms of the settings; `None` when `e` is not one.
fn explain(b: &Broker, e: &lapin::Error) -> Option<TlsError> {
    let lapin::ErrorKind::IOError(io) = e.kind() else { return None };
    let url = redact(&b.url);
    let cert = b.tls_cert_file.trim();
    let Some(tls) = rustls_error(io) else {
        // In TLS 1.3 the broker judges the client certificate after the client's side of the
        // handshake is done; its refusal then often arrives as a reset rather than as an alert.
        let closed = matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::BrokenPipe
        );
        if closed && !cert.is_empty() && b.url.starts_with("amqps://") {
            return Some(TlsError::ClientCertificate {
                url,
                advice: format!(
                    "the broker closed the connection while it was being opened; it may not accept the client \
                     certificate in broker.tls_cert_file ('{cert}'): check that a CA it trusts signed it"
                ),
                detail: io.to_string(),
            });
        }
        return None;
    };
    let detail = tls.to_string();
    let ca = b.tls_ca_file.trim();
    match tls {
        rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
        | rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext { .. }) => {
            Some(TlsError::ServerCertificate {
                url,
                advice: "its certificate does not name the host of broker.url; connect by a name the certificate \
                         carries"
                    .into(),
                detail,
            })
        }
        rustls::Error::InvalidCertificate(_) => {
            let advice = if ca.is_empty() {
                "its certificate is not signed by a CA this machine trusts; set broker.tls_ca_file to the PEM file \
                 of the CA that signed it"
                    .to_string()
            } else {
                format!(
                    "its certificate is signed neither by the CA in broker.tls_ca_file ('{ca}') nor by a CA this \
                     machine trusts; set broker.tls_ca_file to the CA that signed the broker's certificate"
                )
            };
            Some(TlsError::ServerCertificate { url, advice, detail })
        }
        rustls::Error::AlertReceived(_) => {
            let advice = if cert.is_empty() {
                "the broker ended the handshake; if it requires a client certificate, set broker.tls_cert_file and \
                 broker.tls_key_file"
                    .to_string()
            } else {
                format!(
                    "the broker ended the handshake; it may not accept the client certificate in broker.tls_cert_file \
                     ('{cert}'): check that a CA it trusts signed it"
                )
            };
            Some(TlsError::ClientCertificate { url, advice, detail })
        }
        _ => Some(TlsError::ServerCertificate { url, advice: "the TLS handshake failed".into(), detail }),
    }
}

/// The rustls error somewhere in `e`'s chain of causes.
fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|c| c as _);
    while let Some(c) = cause {
        if let Some(tls) = c.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            cause = Some(inner as _);
            continue;
        }
        cause = c.source();
    }
    None
}
