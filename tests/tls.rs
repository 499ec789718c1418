//! RabbitMQ over TLS (`amqps://`) against the real broker's TLS listener, with the test CA and
//! certificates scripts/setup.sh makes in /var/lib/iomt-connector-test/tls (see docs/tls.md). The test CA is not in
//! the system trust store, so what makes the broker trusted here is `broker.tls_ca_file`.
//! A missing listener or certificate fails the test with what to run; nothing is skipped.

mod common;

use common::services::{self, Bed, Connector, Fhir, Setup, bed};
use common::vitals::*;
use iomt_connector::config::Broker;
use iomt_connector::problems::redact;
use iomt_connector::source::rabbitmq::tls::TlsError;
use iomt_connector::source::rabbitmq::{BrokerError, Publisher};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The TLS listener: `localhost`, because the broker's certificate names it (and 127.0.0.1).
fn amqps_url() -> String {
    std::env::var("IOMT_TEST_AMQPS_URL").unwrap_or_else(|_| "amqps://guest:guest@localhost:5671/%2f".into())
}

/// The machine's test CA folder (`services::tls_dir`), checked to hold what the tests use, with the
/// listener up.
fn tls_dir() -> PathBuf {
    let dir = services::tls_dir();
    for f in ["ca.pem", "other-ca.pem", "client.pem", "client.key", "other-client.pem", "other-client.key"] {
        assert!(
            dir.join(f).is_file(),
            "{} is missing: run scripts/setup.sh (it makes the test CA and certificates)",
            dir.join(f).display()
        );
    }
    let url = amqps_url();
    let addr = url.rsplit('@').next().and_then(|h| h.split('/').next()).unwrap_or("localhost:5671").to_string();
    assert!(
        std::net::TcpStream::connect(&addr).is_ok(),
        "nothing listens at {addr} (RabbitMQ's TLS listener, {}): run scripts/setup.sh",
        redact(&url)
    );
    dir
}

fn file(name: &str) -> String {
    tls_dir().join(name).display().to_string()
}

fn tls_broker(queue: &str, ca: &str, identity: Option<(&str, &str)>) -> Broker {
    let mut b = services::broker_settings(queue);
    b.url = amqps_url();
    b.tls_ca_file = ca.to_string();
    if let Some((cert, key)) = identity {
        (b.tls_cert_file, b.tls_key_file) = (cert.to_string(), key.to_string());
    }
    b
}

/// The connector's environment for `tls_broker`'s settings.
fn tls_env(b: &Broker) -> Vec<(&'static str, String)> {
    vec![
        ("IOMT_BROKER__URL", b.url.clone()),
        ("IOMT_BROKER__TLS_CA_FILE", b.tls_ca_file.clone()),
        ("IOMT_BROKER__TLS_CERT_FILE", b.tls_cert_file.clone()),
        ("IOMT_BROKER__TLS_KEY_FILE", b.tls_key_file.clone()),
    ]
}

/// Publishes over TLS with the connector's own publisher (the one `publish` and `simulate` use).
async fn publish_over_tls(b: &Broker, msgs: &[Vec<u8>]) {
    let mut p = Publisher::connect(b, 200).await.unwrap_or_else(|e| panic!("publisher over TLS: {e}"));
    for m in msgs {
        p.send(m, None).await.unwrap_or_else(|e| panic!("{e}"));
    }
    p.flush().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.confirmed as usize, msgs.len(), "the broker confirmed every message");
}

/// What RabbitMQ says of the TLS connections whose client properties mention `queue` (the
/// consumer names its connection after its queue): `ssl` and the client certificate's subject.
fn tls_connections(queue: &str) -> Vec<String> {
    services::rabbitmqctl(&["-q", "list_connections", "ssl", "peer_cert_subject", "client_properties"])
        .lines()
        .filter(|l| l.contains(queue))
        .map(|l| l.split('\t').take(2).collect::<Vec<_>>().join(" "))
        .collect()
}

async fn run_to_observations(bed: &Bed, b: &Broker, devices: usize) -> Connector {
    let msgs = bodies(&bed.run, devices, 5, &[Vital::HeartRate, Vital::BloodPressure]);
    let mut setup = Setup::new(&bed.queue, "Create", &bed.system);
    setup.extra = tls_env(b);
    let connector = Connector::start(&setup).await;
    publish_over_tls(b, &msgs).await;
    connector.wait_acked(msgs.len() as f64, Duration::from_secs(120)).await;
    assert_eq!(connector.metric("iomt_dead_lettered_total").await, 0.0);
    assert_converged(&Fhir::new(), &bed.run, devices, &uninterrupted(&msgs, &bed.system)).await;
    connector
}

#[tokio::test(flavor = "multi_thread")]
async fn amqps_with_the_test_ca_in_broker_tls_ca_file_is_read_to_observations_and_acked() {
    let bed = bed("tls").await;
    let b = tls_broker(&bed.queue, &file("ca.pem"), None);
    let connector = run_to_observations(&bed, &b, 3).await;
    let conns = tls_connections(&bed.queue);
    assert!(
        conns.iter().any(|c| c == "true "),
        "the connector's connection is TLS without a client certificate: {conns:?}"
    );

    // The dead-letter commands open their own connection: over TLS too.
    let (code, out) = services::dead_letters(&connector.env, &["list"]);
    assert_eq!(code, 0, "dead-letters list over TLS: {out}");
    assert!(out.contains(&format!("{}.dlq: 0 message(s)", bed.queue)), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_with_the_client_certificate_is_read_to_observations_and_the_broker_sees_the_certificate() {
    let bed = bed("mtls").await;
    let b = tls_broker(&bed.queue, &file("ca.pem"), Some((&file("client.pem"), &file("client.key"))));
    let _connector = run_to_observations(&bed, &b, 2).await;
    let conns = tls_connections(&bed.queue);
    assert!(
        conns.iter().any(|c| c.starts_with("true ") && c.contains("CN=iomt-connector test client")),
        "the broker saw the test client's certificate on the connector's connection: {conns:?}"
    );

    // A certificate the broker's CA did not sign is refused, and the error names the key.
    let stranger =
        tls_broker(&bed.queue, &file("ca.pem"), Some((&file("other-client.pem"), &file("other-client.key"))));
    match Publisher::connect(&stranger, 1).await {
        Ok(_) => panic!("the broker took a client certificate signed by an unrelated CA"),
        Err(e) => {
            let text = e.to_string();
            println!("{text}");
            assert!(matches!(e, BrokerError::Tls(TlsError::ClientCertificate { .. })), "{text}");
            assert!(text.contains("broker.tls_cert_file"), "{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_or_missing_ca_fails_with_an_error_naming_broker_tls_ca_file_and_the_broker() {
    let bed = bed("tlsbadca").await;
    let check = |e: &BrokerError, ca_named: bool| {
        let text = e.to_string();
        println!("{text}");
        assert!(matches!(e, BrokerError::Tls(TlsError::ServerCertificate { .. })), "{text}");
        assert!(text.contains("broker.tls_ca_file"), "{text}");
        assert!(text.contains(&redact(&amqps_url())), "names the broker: {text}");
        assert!(!text.contains("guest:guest"), "no password: {text}");
        assert_eq!(text.contains("other-ca.pem"), ca_named, "{text}");
    };
    // The CA of another deployment.
    let wrong = tls_broker(&bed.queue, &file("other-ca.pem"), None);
    match Publisher::connect(&wrong, 1).await {
        Ok(_) => panic!("connected over TLS with a CA that did not sign the broker's certificate"),
        Err(e) => check(&e, true),
    }
    // None at all: the system's roots do not know the test CA.
    let none = tls_broker(&bed.queue, "", None);
    match Publisher::connect(&none, 1).await {
        Ok(_) => panic!("the system trust store knows the test CA: the TLS tests need it not to (docs/tls.md)"),
        Err(e) => check(&e, false),
    }

    // `run` keeps trying, unready, and says why in its log.
    let mut setup = Setup::new(&bed.queue, "Create", &bed.system);
    setup.extra = tls_env(&wrong);
    let connector = Connector::spawn_env(Connector::env_for(&setup));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !connector.log().contains("broker.tls_ca_file") {
        assert!(Instant::now() < deadline, "no error naming broker.tls_ca_file in 60 s; log:\n{}", connector.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = connector.log();
    assert!(!log.contains("guest:guest"), "no password in the log:\n{log}");
    let (status, _) = connector.get("/health/ready").await;
    assert_eq!(status, 503, "not ready without a trusted broker");
}
