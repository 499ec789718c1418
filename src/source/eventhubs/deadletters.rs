//! `dead-letters list|redrive` for the Event Hubs source: the dead-letter hub read from its
//! earliest event up to the last one enqueued when it was opened, without what was already
//! redriven; a redrive sends an event back to the hub the connector reads and then records it
//! (`store::Redriven`), because an event cannot be taken out of a hub.

use super::client::{consumer, producer};
use super::envelope::envelope;
use super::reader::drop_service_stamps;
use super::settings::EventHubs;
use super::store::{Redriven, StoreError};
use super::{
    ERROR_KIND_PROPERTY, ERROR_PROPERTY, EventHubsError, SOURCE_HUB_PROPERTY, SOURCE_PARTITION_PROPERTY,
    SOURCE_SEQUENCE_PROPERTY,
};
use crate::source::{DeadLetter, DeadLetters, Position};
use azure_core_amqp::{AmqpMessage, AmqpSimpleValue};
use azure_messaging_eventhubs::{
    ConsumerClient, OpenReceiverOptions, ProducerClient, SendMessageOptions, StartLocation, StartPosition,
};
use futures_util::StreamExt;
use std::collections::VecDeque;
use std::time::Duration;

/// The dead-letter hub is read through the consumer group every hub has: the connector's own
/// (`eventhubs.consumer_group`) is made on the hub it reads and need not exist on this one.
const CONSUMER_GROUP: &str = "$Default";

/// How long a partition may keep back an event it said it holds: the reading never waits for new
/// events, so a silence this long is a fault, not an empty hub.
const EVENT_PATIENCE: Duration = Duration::from_secs(30);

/// The application properties `reader::dead_letter_message` adds to the original event.
const DEAD_LETTER_PROPERTIES: [&str; 5] =
    [ERROR_KIND_PROPERTY, ERROR_PROPERTY, SOURCE_HUB_PROPERTY, SOURCE_PARTITION_PROPERTY, SOURCE_SEQUENCE_PROPERTY];

/// What went wrong, naming the hub and the setting to check.
#[derive(Debug, thiserror::Error)]
pub enum LettersError {
    #[error("{key} {message}")]
    Setting { key: &'static str, message: &'static str },
    #[error("dead-letter hub {hub} (eventhubs.dead_letter_hub, read through its $Default consumer group): {message}")]
    DeadLetterHub { hub: String, message: String },
    #[error("event hub {hub} (eventhubs.hub): {message}")]
    Hub { hub: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("sent back to event hub {hub} but not recorded as redriven, so a later redrive sends it again: {source}")]
    NotRecorded { hub: String, source: StoreError },
    #[error("not a dead letter of this dead-letter hub")]
    Foreign,
}

/// The source's dead letters (`Source::dead_letters`).
pub(super) async fn open(s: &EventHubs) -> Result<Box<dyn DeadLetters>, String> {
    match HubLetters::open(s).await {
        Ok(l) => Ok(Box::new(l)),
        Err(e) => Err(e.to_string()),
    }
}

/// A dead letter's place in the dead-letter hub, and the event a redrive sends.
struct Record {
    partition: String,
    sequence_number: i64,
    event: AmqpMessage,
    /// The partition of the connector's hub it was read from, when it was read from that hub.
    from_partition: Option<String>,
}

/// A partition's events when the dead-letter hub was opened: sequence numbers `first..=last`.
struct Span {
    partition: String,
    first: i64,
    last: i64,
}

/// The hub the connector reads, opened for the first redriven event.
struct Target {
    producer: ProducerClient,
    partitions: Vec<String>,
}

struct HubLetters {
    s: EventHubs,
    dead_letter_hub: String,
    consumer: ConsumerClient,
    redriven: Redriven,
    /// The partitions not read yet, each up to where it ended when the hub was opened.
    partitions: VecDeque<Span>,
    /// Read from the last partition, not yet taken.
    ready: VecDeque<DeadLetter>,
    target: Option<Target>,
}

impl HubLetters {
    async fn open(s: &EventHubs) -> Result<HubLetters, LettersError> {
        if s.dead_letter_hub.is_empty() {
            return Err(LettersError::Setting {
                key: "eventhubs.dead_letter_hub",
                message: "is not set: name the event hub the connector sends its dead letters to",
            });
        }
        let dead_letter_hub = s.dead_letter_hub.clone();
        let dead = |e: &dyn std::fmt::Display| LettersError::DeadLetterHub {
            hub: dead_letter_hub.clone(),
            message: e.to_string(),
        };
        let redriven = Redriven::open(s, &dead_letter_hub).await?;
        let reading = EventHubs { consumer_group: CONSUMER_GROUP.into(), ..s.clone() };
        let consumer = consumer(&reading, &dead_letter_hub).await.map_err(|e| dead(&detail(e)))?;
        let props = consumer.get_eventhub_properties().await.map_err(|e| dead(&e))?;
        // Where each partition ends now: what the connector dead-letters meanwhile waits for the
        // next reading.
        let mut partitions = VecDeque::new();
        for partition in props.partition_ids {
            let p = consumer.get_partition_properties(&partition).await.map_err(|e| dead(&e))?;
            let (first, last) = (p.beginning_sequence_number, p.last_enqueued_sequence_number);
            if !p.is_empty && last >= first {
                partitions.push_back(Span { partition, first, last });
            }
        }
        Ok(HubLetters {
            s: s.clone(),
            dead_letter_hub,
            consumer,
            redriven,
            partitions,
            ready: VecDeque::new(),
            target: None,
        })
    }

    fn dead(&self, message: impl std::fmt::Display) -> LettersError {
        LettersError::DeadLetterHub { hub: self.dead_letter_hub.clone(), message: message.to_string() }
    }

    /// The dead letters of one partition's span not yet redriven.
    async fn read_partition(&self, span: &Span) -> Result<VecDeque<DeadLetter>, LettersError> {
        let (partition, first, last) = (span.partition.as_str(), span.first, span.last);
        let done = self.redriven.of_partition(partition, first, last).await?;
        let options = OpenReceiverOptions {
            start_position: Some(StartPosition { location: StartLocation::Earliest, inclusive: false }),
            ..Default::default()
        };
        let receiver = self
            .consumer
            .open_receiver_on_partition(partition.to_string(), Some(options))
            .await
            .map_err(|e| self.dead(format_args!("partition {partition}: {e}")))?;
        let target = self.s.hub_name();
        let mut letters = VecDeque::new();
        let read = async {
            let mut events = Box::pin(receiver.stream_events());
            loop {
                let event = match tokio::time::timeout(EVENT_PATIENCE, events.next()).await {
                    Ok(Some(Ok(event))) => event,
                    Ok(Some(Err(e))) => return Err(self.dead(format_args!("partition {partition}: {e}"))),
                    Ok(None) => return Err(self.dead(format_args!("partition {partition}: the receiver closed"))),
                    Err(_) => {
                        return Err(self.dead(format_args!(
                            "partition {partition}: no event for {} s before sequence number {last}, its last when opened",
                            EVENT_PATIENCE.as_secs()
                        )));
                    }
                };
                // The service stamps every event; one without a number is not a hub's.
                let Some(seq) = event.sequence_number() else { continue };
                if seq > last {
                    return Ok(());
                }
                if !done.contains(&seq) {
                    letters.push_back(letter(partition, seq, event.raw_amqp_message(), &target));
                }
                if seq == last {
                    return Ok(());
                }
            }
        };
        let read = read.await;
        // Closed, not just dropped: the SDK's connection would keep the link.
        let _ = tokio::time::timeout(Duration::from_secs(1), receiver.close()).await;
        read.map(|()| letters)
    }

    /// The hub the connector reads, opened once.
    async fn target(&mut self) -> Result<&Target, LettersError> {
        let t = match self.target.take() {
            Some(t) => t,
            None => self.open_target().await?,
        };
        Ok(self.target.insert(t))
    }

    async fn open_target(&self) -> Result<Target, LettersError> {
        let hub = self.s.hub_name();
        if hub.is_empty() {
            return Err(LettersError::Setting {
                key: "eventhubs.hub",
                message: "is not set: name the event hub the connector reads (or give EntityPath= in eventhubs.connection_string)",
            });
        }
        let failed = |e: &dyn std::fmt::Display| LettersError::Hub { hub: hub.clone(), message: e.to_string() };
        let producer = producer(&self.s, &hub).await.map_err(|e| failed(&detail(e)))?;
        let partitions = producer.get_eventhub_properties().await.map_err(|e| failed(&e))?.partition_ids;
        Ok(Target { producer, partitions })
    }

    async fn send_back(&mut self, r: Record) -> Result<(), LettersError> {
        let hub = self.s.hub_name();
        let target = self.target().await?;
        // Back on the partition it was read from: a device's events stay on one partition (its
        // partition key hashed there), and so in order. The dead letter no longer carries the key.
        let partition_id = r.from_partition.filter(|p| target.partitions.contains(p));
        let options = partition_id.map(|p| SendMessageOptions { partition_id: Some(p) });
        target
            .producer
            .send_message(r.event, options)
            .await
            .map_err(|e| LettersError::Hub { hub: hub.clone(), message: e.to_string() })?;
        self.redriven
            .record(&r.partition, r.sequence_number, &hub)
            .await
            .map_err(|source| LettersError::NotRecorded { hub, source })
    }
}

#[async_trait::async_trait(?Send)]
impl DeadLetters for HubLetters {
    fn name(&self) -> String {
        self.dead_letter_hub.clone()
    }

    fn what(&self) -> &'static str {
        "dead-letter hub"
    }

    fn back_to(&self) -> String {
        format!("event hub {}", self.s.hub_name())
    }

    async fn take(&mut self) -> Result<Option<DeadLetter>, String> {
        loop {
            if let Some(d) = self.ready.pop_front() {
                return Ok(Some(d));
            }
            let Some(span) = self.partitions.pop_front() else { return Ok(None) };
            self.ready = self.read_partition(&span).await.map_err(|e| e.to_string())?;
        }
    }

    /// Sent to `eventhubs.hub`; recorded as redriven once the service has taken it.
    async fn move_back(&mut self, d: DeadLetter) -> Result<(), String> {
        let Some(r) = d.record.into_inner::<Record>() else { return Err(LettersError::Foreign.to_string()) };
        self.send_back(r).await.map_err(|e| e.to_string())
    }

    async fn close(self: Box<Self>) {
        let this = *self;
        if let Some(t) = this.target {
            let _ = tokio::time::timeout(Duration::from_secs(5), t.producer.close()).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), this.consumer.close()).await;
    }
}

/// What the client said, without the hub's name (the errors here name it with its setting).
fn detail(e: EventHubsError) -> String {
    match e {
        EventHubsError::Hub { message, .. } => message,
        other => other.to_string(),
    }
}

/// A dead letter read at `seq` of `partition`; `hub` is where a redrive sends it.
fn letter(partition: &str, seq: i64, m: &AmqpMessage, hub: &str) -> DeadLetter {
    let (kind, error) = match (text(m, ERROR_KIND_PROPERTY), text(m, ERROR_PROPERTY)) {
        (Some(kind), error) => (kind, error.unwrap_or_default()),
        (None, _) => ("unknown".to_string(), format!("no {ERROR_KIND_PROPERTY} application property")),
    };
    let from_partition =
        (text(m, SOURCE_HUB_PROPERTY).as_deref() == Some(hub)).then(|| text(m, SOURCE_PARTITION_PROPERTY)).flatten();
    let received = restored(m);
    let envelope = envelope(&received);
    let mut event = received;
    drop_service_stamps(&mut event);
    let record = Record { partition: partition.to_string(), sequence_number: seq, event, from_partition };
    DeadLetter { kind, error, envelope, record: Position::new(record) }
}

/// The event as it was before it was dead-lettered: without the properties the dead-lettering
/// added. Its `x-opt-*` annotations are the dead-letter hub's, kept for the envelope: the hub it
/// is sent back to stamps its own, which the envelope cannot know beforehand.
fn restored(dead: &AmqpMessage) -> AmqpMessage {
    let mut m = dead.clone();
    m.delivery_annotations = None;
    if let Some(app) = m.application_properties.as_mut() {
        for k in DEAD_LETTER_PROPERTIES {
            app.0.remove(k);
        }
        if app.0.is_empty() {
            m.application_properties = None;
        }
    }
    m
}

/// An application property as text (the dead-letter properties are strings; the sequence number
/// a long).
fn text(m: &AmqpMessage, key: &str) -> Option<String> {
    match m.application_properties.as_ref()?.0.get(key)? {
        AmqpSimpleValue::String(s) => Some(s.clone()),
        AmqpSimpleValue::Long(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::reader::dead_letter_message;
    use super::*;
    use crate::model::kind::{ErrorKind, Failure};
    use azure_core_amqp::message::{
        AmqpAnnotationKey, AmqpAnnotations, AmqpApplicationProperties, AmqpMessageBody, AmqpMessageId,
        AmqpMessageProperties,
    };
    use azure_core_amqp::{AmqpSymbol, AmqpValue};

    fn sym(s: &str) -> AmqpAnnotationKey {
        AmqpAnnotationKey::Symbol(AmqpSymbol(s.into()))
    }

    /// An event as a hub delivers it: a device's annotation and the service's stamps.
    fn delivered(mut m: AmqpMessage, seq: i64) -> AmqpMessage {
        let a = m.message_annotations.get_or_insert_with(AmqpAnnotations::new);
        a.0.insert(sym("x-opt-sequence-number"), AmqpValue::Long(seq));
        a.0.insert(sym("x-opt-offset"), AmqpValue::String(format!("{}", seq * 100)));
        m
    }

    fn original() -> AmqpMessage {
        let mut app = AmqpApplicationProperties::new();
        app.0.insert("iothub-creation-time-utc".into(), AmqpSimpleValue::String("2019-01-30T22:45:02Z".into()));
        app.0.insert("x-iomt-sent-at".into(), AmqpSimpleValue::Long(1_700_000_000_000));
        let mut ann = AmqpAnnotations::new();
        ann.0.insert(sym("iothub-connection-device-id"), AmqpValue::String("dev-1".into()));
        AmqpMessage {
            body: AmqpMessageBody::Binary(vec![br#"{"heartrate": "203"}"#.to_vec()]),
            application_properties: Some(app),
            message_annotations: Some(ann),
            properties: Some(AmqpMessageProperties {
                message_id: Some(AmqpMessageId::String("m-1".into())),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn without_stamps(mut v: serde_json::Value) -> serde_json::Value {
        if let Some(sys) = v["SystemProperties"].as_object_mut() {
            sys.retain(|k, _| !k.starts_with("x-opt-"));
        }
        v
    }

    #[test]
    fn a_dead_letter_gives_back_the_envelope_and_the_event_of_the_original() {
        let read = delivered(original(), 41);
        let failure = Failure { kind: ErrorKind::MissingValue, message: "no timestamp".into() };
        let sent = dead_letter_message(&read, &failure, "devices", "3", 41);
        let d = letter("0", 7, &delivered(sent, 7), "devices");
        assert_eq!((d.kind.as_str(), d.error.as_str()), ("missing-value", "no timestamp"));
        let want = envelope(&read).unwrap_or_else(|e| panic!("{e}"));
        let got = d.envelope.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(without_stamps(got.clone()), without_stamps(want));
        assert_eq!(got["SystemProperties"]["x-opt-sequence-number"], 7, "the stamps of the hub it was read from");
        let r = d.record.into_inner::<Record>().unwrap_or_else(|| panic!("a record"));
        assert_eq!((r.partition.as_str(), r.sequence_number, r.from_partition.as_deref()), ("0", 7, Some("3")));
        assert_eq!(r.event, original(), "sent back as it first arrived, without the service's stamps");
    }

    #[test]
    fn a_dead_letter_from_another_hub_or_without_a_reason_is_still_listed() {
        let failure = Failure { kind: ErrorKind::InvalidJson, message: "not JSON".into() };
        let mut bare = AmqpMessage { body: AmqpMessageBody::Binary(vec![b"{nope".to_vec()]), ..Default::default() };
        let d = letter("1", 0, &dead_letter_message(&bare, &failure, "old-hub", "2", 5), "devices");
        assert!(d.envelope.is_err_and(|e| e.contains("not valid JSON")));
        let r = d.record.into_inner::<Record>().unwrap_or_else(|| panic!("a record"));
        assert_eq!((r.from_partition, r.event.application_properties), (None, None));
        bare.body = AmqpMessageBody::Empty;
        let d = letter("1", 1, &bare, "devices");
        assert_eq!(d.kind, "unknown");
    }
}
