//! The Event Hubs ceiling for scripts/bench-eventhubs.sh: a bare consumer of every partition of a
//! hub (Microsoft's SDK, as the connector uses it) that only counts events, timed from its first
//! event to the COUNT-th. Settings from the environment, as `run` reads them
//! (IOMT_EVENTHUBS__CONNECTION_STRING, IOMT_EVENTHUBS__CUSTOM_ENDPOINT).
//!   cargo run --release --example eh_consumer -- HUB COUNT

use futures_util::StreamExt;
use iomt_connector::config::EventHubs;
use iomt_connector::source::eventhubs;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(hub), Some(count)) = (args.get(1), args.get(2).and_then(|c| c.parse::<u64>().ok())) else {
        eprintln!("usage: eh_consumer HUB COUNT");
        std::process::exit(2);
    };
    let s = EventHubs {
        connection_string: std::env::var("IOMT_EVENTHUBS__CONNECTION_STRING").unwrap_or_default(),
        custom_endpoint: std::env::var("IOMT_EVENTHUBS__CUSTOM_ENDPOINT").unwrap_or_default(),
        ..Default::default()
    };
    // Current-thread, as the connector's sources run.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(async {
        let consumer = Arc::new(eventhubs::consumer(&s, hub).await.unwrap_or_else(|e| panic!("{e}")));
        let props = consumer.get_eventhub_properties().await.unwrap_or_else(|e| panic!("{e}"));
        let seen = Arc::new(AtomicU64::new(0));
        let first: Arc<std::sync::OnceLock<Instant>> = Arc::default();
        let done = Arc::new(tokio::sync::Notify::new());
        for p in props.partition_ids {
            let (consumer, seen, first, done) = (consumer.clone(), seen.clone(), first.clone(), done.clone());
            tokio::spawn(async move {
                let start = azure_messaging_eventhubs::StartPosition {
                    location: azure_messaging_eventhubs::StartLocation::Earliest,
                    inclusive: false,
                };
                let options = azure_messaging_eventhubs::OpenReceiverOptions {
                    start_position: Some(start),
                    prefetch: Some(1000),
                    ..Default::default()
                };
                let r = consumer.open_receiver_on_partition(p, Some(options)).await.unwrap_or_else(|e| panic!("{e}"));
                let mut events = Box::pin(r.stream_events());
                while let Some(e) = events.next().await {
                    if e.is_ok() {
                        first.get_or_init(Instant::now);
                        if seen.fetch_add(1, Ordering::Relaxed) + 1 >= count {
                            done.notify_one();
                        }
                    }
                }
            });
        }
        done.notified().await;
        let secs = first.get().map_or(0.0, |t| t.elapsed().as_secs_f64());
        // The process's CPU seconds (user + system, whole run), from /proc/self/stat at 100 ticks/s.
        let cpu = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|st| {
                let f: Vec<&str> = st.rsplit_once(") ")?.1.split(' ').collect();
                Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
            })
            .unwrap_or(f64::NAN);
        println!("{count} events in {secs:.3} s: {:.0} events/s, cpu {cpu:.2} s", count as f64 / secs.max(1e-9));
    });
}
