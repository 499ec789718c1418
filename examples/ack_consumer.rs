//! The broker ceiling for scripts/bench.sh: a bare lapin consumer that only acks, as the connector
//! does (one ack per message, same prefetch), timed from its first delivery to its last.
//!   cargo run --release --example ack_consumer -- QUEUE COUNT [PREFETCH]

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(queue), Some(count)) = (args.get(1), args.get(2).and_then(|c| c.parse::<u64>().ok())) else {
        eprintln!("usage: ack_consumer QUEUE COUNT [PREFETCH]");
        std::process::exit(2);
    };
    let prefetch: u16 = args.get(3).and_then(|p| p.parse().ok()).unwrap_or(2000);
    let url = std::env::var("IOMT_BROKER__URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(async {
        let conn =
            Connection::connect(&url, ConnectionProperties::default()).await.unwrap_or_else(|e| panic!("{url}: {e}"));
        let ch = conn.create_channel().await.unwrap_or_else(|e| panic!("{e}"));
        ch.basic_qos(prefetch, BasicQosOptions::default()).await.unwrap_or_else(|e| panic!("{e}"));
        let mut consumer = ch
            .basic_consume(
                queue.as_str().into(),
                "ack-consumer".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut n = 0u64;
        let mut first = None;
        while let Some(d) = consumer.next().await {
            let d = d.unwrap_or_else(|e| panic!("{e}"));
            first.get_or_insert_with(Instant::now);
            d.acker.ack(BasicAckOptions::default()).await.unwrap_or_else(|e| panic!("{e}"));
            n += 1;
            if n >= count {
                break;
            }
        }
        let secs = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(0.0);
        println!("{n} {secs:.3} {:.0}", n as f64 / secs.max(1e-9));
    });
}
