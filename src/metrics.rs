//! Prometheus metrics: one registry for the process, rendered at `/metrics`.

pub use prometheus::proto::MetricType;
use prometheus::{
    Counter, CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
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
    pub fhir_batch_entries: HistogramVec,
    pub fhir_request_seconds: HistogramVec,
    pub latency: Histogram,
    pub backlog: IntGauge,
    pub unacked: IntGauge,
    pub in_flight_bytes: IntGauge,
    pub in_flight_bytes_limit: IntGauge,
    pub source_pauses: IntCounter,
    pub fhir_circuit_open: IntGauge,
    pub fhir_outage_seconds: Counter,
    pub fhir_wait_seconds: CounterVec,
    pub held_groups: IntGauge,
    pub queue_deliveries: IntCounterVec,
    pub queue_active: IntGaugeVec,
    pub create_races: IntCounter,
    pub fhir_invalid_responses: IntCounterVec,
    pub unconfirmed_writes: IntCounterVec,
    pub mappings_info: IntGaugeVec,
    pub mapping_reloads: IntCounterVec,
    pub mappings_refused: IntGauge,
    pub source_info: IntGaugeVec,
    pub partitions_owned: IntGauge,
    pub checkpoint_lag: IntGaugeVec,
    pub partition_events: IntCounterVec,
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(r, name, IntGaugeVec::new(Opts::new(name, help), labels))
}

/// Every metric registered, with its type: a labelled metric none of whose labels has been seen
/// yet is absent from `/metrics`, and the dashboard's and alerts' tests need them all.
static CATALOGUE: std::sync::Mutex<Vec<(String, MetricType)>> = std::sync::Mutex::new(Vec::new());

/// Registers a metric whose name and labels are fixed here, so neither can fail at run time.
fn register<M: prometheus::core::Collector + Clone + 'static>(r: &Registry, name: &str, m: prometheus::Result<M>) -> M {
    let m = m.unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(m.clone())).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    if let Ok(mut c) = CATALOGUE.lock() {
        c.extend(m.collect().iter().map(|f| (f.name().to_string(), f.get_field_type())));
    }
    m
}

/// The name and type of every metric the connector exports, seen or not.
pub fn catalogue() -> Vec<(String, MetricType)> {
    get();
    CATALOGUE.lock().map(|c| c.clone()).unwrap_or_default()
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    register(r, name, IntCounter::new(name, help))
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(r, name, IntCounterVec::new(Opts::new(name, help), labels))
}

fn seconds(r: &Registry, name: &str, help: &str) -> Counter {
    register(r, name, Counter::new(name, help))
}

fn seconds_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> CounterVec {
    register(r, name, CounterVec::new(Opts::new(name, help), labels))
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    register(r, name, IntGauge::new(name, help))
}

/// The process's metrics (names are fixed, so registration cannot fail at run time).
pub fn get() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let r = Registry::new();
        let latency = latency(&r);
        let batch_entries = fhir_batch_entries(&r);
        let request_seconds = fhir_request_seconds(&r);
        Metrics {
            messages_received: counter(&r, "iomt_messages_received_total", "Messages taken from the broker"),
            messages_acked: messages_acked(&r),
            messages_dropped: messages_dropped(&r),
            dead_lettered: dead_lettered(&r),
            measurements: counter(&r, "iomt_measurements_total", "Measurements normalized"),
            groups: counter(&r, "iomt_groups_total", "Measurement groups flushed to the writers"),
            observations: counter_vec(&r, "iomt_observations_total", "Observation writes by outcome", &["outcome"]),
            fhir_requests: fhir_requests(&r),
            fhir_batch_entries: batch_entries,
            fhir_request_seconds: request_seconds,
            latency,
            backlog: gauge(&r, "iomt_broker_backlog_messages", "Messages ready in the queue (sampled)"),
            unacked: gauge(&r, "iomt_unacked_messages", "Messages received and not yet acked"),
            in_flight_bytes: gauge(
                &r,
                "iomt_in_flight_bytes",
                "Bytes of the messages received and not yet settled (bounded by pipeline.max_in_flight_bytes)",
            ),
            in_flight_bytes_limit: gauge(
                &r,
                "iomt_in_flight_bytes_limit",
                "pipeline.max_in_flight_bytes: the source pauses when iomt_in_flight_bytes reaches it",
            ),
            source_pauses: counter(
                &r,
                "iomt_source_pauses_total",
                "Times the source stopped taking messages because pipeline.max_in_flight_bytes was spent",
            ),
            fhir_circuit_open: fhir_circuit_open(&r),
            fhir_outage_seconds: fhir_outage_seconds(&r),
            fhir_wait_seconds: fhir_wait_seconds(&r),
            queue_deliveries: queue_deliveries(&r),
            queue_active: queue_active(&r),
            mappings_info: mappings_info(&r),
            mapping_reloads: mapping_reloads(&r),
            mappings_refused: mappings_refused(&r),
            create_races: create_races(&r),
            fhir_invalid_responses: fhir_invalid_responses(&r),
            unconfirmed_writes: unconfirmed_writes(&r),
            held_groups: held_groups(&r),
            source_info: source_info(&r),
            partitions_owned: partitions_owned(&r),
            checkpoint_lag: checkpoint_lag(&r),
            partition_events: partition_events(&r),
            registry: r,
        }
    })
}

// Each metric whose construction does not fit on one line of `get` has a constructor named after its
// field, so that `get` stays a one-line-per-metric list short enough to read at a glance.

fn latency(r: &Registry) -> Histogram {
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
    register(r, "iomt_end_to_end_latency_seconds", Ok(latency))
}

fn fhir_batch_entries(r: &Registry) -> HistogramVec {
    register(
        r,
        "iomt_fhir_batch_entries",
        HistogramVec::new(
            HistogramOpts::new(
                "iomt_fhir_batch_entries",
                "Entries per batch Bundle sent to the FHIR server (op: read, write)",
            )
            .buckets(vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0]),
            &["op"],
        ),
    )
}

fn fhir_request_seconds(r: &Registry) -> HistogramVec {
    register(
        r,
        "iomt_fhir_request_duration_seconds",
        HistogramVec::new(
            HistogramOpts::new(
                "iomt_fhir_request_duration_seconds",
                "Time from sending a FHIR request to its whole answer, by method (one try; retries count again)",
            )
            .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["method"],
        ),
    )
}

fn messages_acked(r: &Registry) -> IntCounter {
    counter(r, "iomt_messages_acked_total", "Messages acked (persisted, dead-lettered or dropped)")
}

fn messages_dropped(r: &Registry) -> IntCounterVec {
    counter_vec(r, "iomt_messages_dropped_total", "Messages acked without output, by reason", &["reason"])
}

fn dead_lettered(r: &Registry) -> IntCounterVec {
    counter_vec(r, "iomt_dead_lettered_total", "Messages sent to the dead-letter exchange, by error kind", &["kind"])
}

fn fhir_requests(r: &Registry) -> IntCounterVec {
    counter_vec(r, "iomt_fhir_requests_total", "FHIR HTTP requests by method and status", &["method", "status"])
}

fn fhir_circuit_open(r: &Registry) -> IntGauge {
    gauge(r, "iomt_fhir_circuit_open", "1 while the FHIR server is unavailable and messages are held unacked")
}

fn fhir_outage_seconds(r: &Registry) -> Counter {
    seconds(r, "iomt_fhir_outage_seconds_total", "Time the FHIR server has been unavailable (circuit open)")
}

fn fhir_wait_seconds(r: &Registry) -> CounterVec {
    seconds_vec(
        r,
        "iomt_fhir_wait_seconds_total",
        "Time spent waiting before retrying FHIR requests, by cause (retry-after: the server's Retry-After; backoff: our own)",
        &["cause"],
    )
}

fn queue_deliveries(r: &Registry) -> IntCounterVec {
    counter_vec(r, "iomt_queue_deliveries_total", "Messages received, by the queue they came from", &["queue"])
}

fn queue_active(r: &Registry) -> IntGaugeVec {
    gauge_vec(
        r,
        "iomt_queue_active",
        "1 where this instance is the queue's active consumer, 0 where it stands by (asked of broker.management_url)",
        &["queue"],
    )
}

fn mappings_info(r: &Registry) -> IntGaugeVec {
    gauge_vec(r, "iomt_mappings_info", "1 for the version of the mappings in force", &["version"])
}

fn mapping_reloads(r: &Registry) -> IntCounterVec {
    counter_vec(r, "iomt_mapping_reloads_total", "Mapping reloads by result (applied, refused)", &["result"])
}

fn mappings_refused(r: &Registry) -> IntGauge {
    gauge(
        r,
        "iomt_mappings_refused",
        "1 while the mapping files on disk are refused (the pair in force keeps running), 0 once a reload loads",
    )
}

fn create_races(r: &Registry) -> IntCounter {
    counter(
        r,
        "iomt_fhir_create_races_total",
        "Windows another writer created between this writer's read and write, repaired from the server's _history",
    )
}

fn fhir_invalid_responses(r: &Registry) -> IntCounterVec {
    counter_vec(
        r,
        "iomt_fhir_invalid_responses_total",
        "Successful FHIR answers that were not the FHIR expected (an HTML page, an empty or broken body, another resource type, a batch answer with the wrong entry count), by method; held and retried like a 503",
        &["method"],
    )
}

fn unconfirmed_writes(r: &Registry) -> IntCounterVec {
    counter_vec(
        r,
        "iomt_fhir_unconfirmed_writes_total",
        "Writes answered 2xx with no version (no etag, no _history location, no echoed resource), by what reading back found: confirmed (persisted) or missing (held and written again)",
        &["result"],
    )
}

fn held_groups(r: &Registry) -> IntGauge {
    gauge(r, "iomt_held_groups", "Measurement groups held for a retry because the FHIR server is unavailable")
}

fn source_info(r: &Registry) -> IntGaugeVec {
    gauge_vec(r, "iomt_source_info", "1 for the source this instance reads (rabbitmq, eventhubs)", &["kind"])
}

fn partitions_owned(r: &Registry) -> IntGauge {
    gauge(r, "iomt_eventhubs_partitions_owned", "Event hub partitions this instance owns and reads")
}

fn checkpoint_lag(r: &Registry) -> IntGaugeVec {
    gauge_vec(
        r,
        "iomt_eventhubs_checkpoint_lag",
        "Events enqueued in the partition after its checkpoint (sampled each balancing round)",
        &["partition"],
    )
}

fn partition_events(r: &Registry) -> IntCounterVec {
    counter_vec(r, "iomt_eventhubs_events_total", "Events read, by partition", &["partition"])
}

/// Messages dead-lettered, of every kind.
pub fn dead_lettered_total() -> u64 {
    use prometheus::core::Collector;
    let families = get().dead_lettered.collect();
    families.iter().flat_map(|f| f.get_metric()).map(|m| m.get_counter().get_value() as u64).sum()
}

/// The text exposition format.
pub fn render() -> String {
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&get().registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}
