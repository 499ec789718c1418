//! Sending events to a hub, for `publish` and `simulate`.

use super::client::producer;
use super::settings::EventHubs;
use super::{EventHubsError, SENT_AT_PROPERTY, hub_error};
use azure_messaging_eventhubs::ProducerClient;
use azure_messaging_eventhubs::models::EventData;
use std::time::SystemTime;

/// An event for `publish`/`simulate`: a JSON body with the send time stamped.
pub fn event(body: &[u8]) -> EventData {
    let now =
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default();
    EventData::builder()
        .with_body(body.to_vec())
        .with_content_type("application/json".into())
        .add_property(SENT_AT_PROPERTY.into(), now)
        .build()
}

/// Sends events to a hub in batches, each to the partition its key (the device id) hashes to, so
/// a device's events stay in order on one partition. `confirmed` counts events the hub accepted.
pub struct HubPublisher {
    producer: ProducerClient,
    hub: String,
    pending: Vec<(Option<String>, Vec<u8>)>,
    batch: usize,
    pub confirmed: u64,
    pub refused: u64,
}

impl HubPublisher {
    pub async fn connect(s: &EventHubs, hub: &str, batch: usize) -> Result<HubPublisher, EventHubsError> {
        let producer = producer(s, hub).await?;
        Ok(HubPublisher {
            producer,
            hub: hub.to_string(),
            pending: Vec::new(),
            batch: batch.clamp(1, 500),
            confirmed: 0,
            refused: 0,
        })
    }

    pub async fn send(&mut self, body: &[u8], key: Option<&str>) -> Result<(), EventHubsError> {
        self.pending.push((key.map(str::to_string), body.to_vec()));
        if self.pending.len() >= self.batch {
            self.flush().await?;
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), EventHubsError> {
        let hub = self.hub.clone();
        let mut by_key: std::collections::BTreeMap<Option<String>, Vec<Vec<u8>>> = Default::default();
        for (k, b) in self.pending.drain(..) {
            by_key.entry(k).or_default().push(b);
        }
        for (key, bodies) in by_key {
            let options = || azure_messaging_eventhubs::EventDataBatchOptions {
                partition_key: key.clone(),
                ..Default::default()
            };
            let mut batch = self.producer.create_batch(Some(options())).await.map_err(|e| hub_error(&hub, e))?;
            for b in bodies {
                if !batch.try_add_event_data(event(&b), None).map_err(|e| hub_error(&hub, e))? {
                    let n = batch.len() as u64;
                    self.producer.send_batch(batch, None).await.map_err(|e| hub_error(&hub, e))?;
                    self.confirmed += n;
                    batch = self.producer.create_batch(Some(options())).await.map_err(|e| hub_error(&hub, e))?;
                    if !batch.try_add_event_data(event(&b), None).map_err(|e| hub_error(&hub, e))? {
                        self.refused += 1;
                        tracing::error!(
                            bytes = b.len(),
                            "an event is larger than the hub's maximum message size; not sent"
                        );
                    }
                }
            }
            if !batch.is_empty() {
                let n = batch.len() as u64;
                self.producer.send_batch(batch, None).await.map_err(|e| hub_error(&hub, e))?;
                self.confirmed += n;
            }
        }
        Ok(())
    }
}
