//! Prometheus metrics: one registry for the process, rendered at `/metrics`.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use std::sync::OnceLock;

pub struct Metrics {
    pub registry: Registry,
    pub messages_received: IntCounter,
    pub messages_acked: IntCounter,
    pub messages_dropped: IntCounterVec,
    pub dead_lettered: IntCounterVec,
    pub measurements: IntCounter,
    pub groups: IntCounter,
    pub observations: IntCounterVec,
    pub fhir_requests: IntCounterVec,
    pub latency: Histogram,
    pub backlog: IntGauge,
    pub unacked: IntGauge,
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(c.clone())).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(c.clone())).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(g.clone())).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    g
}

/// The process's metrics (names are fixed, so registration cannot fail at run time).
pub fn get() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let r = Registry::new();
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "iomt_end_to_end_latency_seconds",
                "From the message's send time (x-iomt-sent-at header or AMQP timestamp; else its arrival) to its ack",
            )
            .buckets(vec![
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.75, 2.0, 2.5, 3.0, 5.0, 10.0,
                30.0, 60.0,
            ]),
        )
        .unwrap_or_else(|e| panic!("latency histogram: {e}"));
        r.register(Box::new(latency.clone())).unwrap_or_else(|e| panic!("latency histogram: {e}"));
        Metrics {
            messages_received: counter(&r, "iomt_messages_received_total", "Messages taken from the broker"),
            messages_acked: counter(
                &r,
                "iomt_messages_acked_total",
                "Messages acked (persisted, dead-lettered or dropped)",
            ),
            messages_dropped: counter_vec(
                &r,
                "iomt_messages_dropped_total",
                "Messages acked without output, by reason",
                &["reason"],
            ),
            dead_lettered: counter_vec(
                &r,
                "iomt_dead_lettered_total",
                "Messages sent to the dead-letter exchange, by error kind",
                &["kind"],
            ),
            measurements: counter(&r, "iomt_measurements_total", "Measurements normalized"),
            groups: counter(&r, "iomt_groups_total", "Measurement groups flushed to the writers"),
            observations: counter_vec(&r, "iomt_observations_total", "Observation writes by outcome", &["outcome"]),
            fhir_requests: counter_vec(
                &r,
                "iomt_fhir_requests_total",
                "FHIR HTTP requests by method and status",
                &["method", "status"],
            ),
            latency,
            backlog: gauge(&r, "iomt_broker_backlog_messages", "Messages ready in the queue (sampled)"),
            unacked: gauge(&r, "iomt_unacked_messages", "Messages received and not yet acked"),
            registry: r,
        }
    })
}

/// The text exposition format.
pub fn render() -> String {
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&get().registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}
