//! One partition's reader: a receiver at the ownership's owner level, events handed to the
//! pipeline, settlements booked, dead letters sent, checkpoints written in order.

use super::book::Book;
use super::context::{Ctx, Phase};
use super::envelope::{annotation_key, body_len, envelope, sent_at};
use super::settings::StartAt;
use super::store::Checkpoint;
use super::{
    ERROR_KIND_PROPERTY, ERROR_PROPERTY, EventHubsError, SOURCE_HUB_PROPERTY, SOURCE_PARTITION_PROPERTY,
    SOURCE_SEQUENCE_PROPERTY, hub_error,
};
use crate::metrics;
use crate::model::kind::ErrorKind;
use crate::source::budget::Lease;
use crate::source::{DeliveryGuard, Failure, Position, Settled, Status, book_dead_lettered, book_settled};
use crate::status::PartitionState;
use azure_core_amqp::message::AmqpAnnotationKey;
use azure_core_amqp::{AmqpMessage, AmqpSimpleValue};
use azure_messaging_eventhubs::models::ReceivedEventData;
use azure_messaging_eventhubs::{EventReceiver, OpenReceiverOptions, StartLocation, StartPosition};
use futures_util::StreamExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{OwnedMutexGuard, mpsc, watch};

/// What the source keeps of an event until it is settled.
struct Record {
    partition: Arc<str>,
    at: Checkpoint,
    /// For the dead-letter hub: the original message.
    message: AmqpMessage,
    /// The body's bytes, counted in flight until the event is settled.
    _lease: Lease,
}

async fn start_position(ctx: &Ctx, partition: &str) -> Result<(StartPosition, Option<Checkpoint>), EventHubsError> {
    let cp = ctx.store.checkpoint(partition).await?;
    let position = match &cp {
        // Everything up to it is persisted or dead-lettered: on from the next.
        Some(c) => StartPosition { location: StartLocation::SequenceNumber(c.sequence_number), inclusive: false },
        None => match ctx.s.start_position() {
            Some(StartAt::Latest) => StartPosition { location: StartLocation::Latest, inclusive: false },
            Some(StartAt::Enqueued(t)) => {
                StartPosition { location: StartLocation::EnqueuedTime(t.into()), inclusive: true }
            }
            Some(StartAt::Earliest) | None => StartPosition { location: StartLocation::Earliest, inclusive: false },
        },
    };
    Ok((position, cp))
}

/// Reads one partition until told to stop or cut off, checkpointing as events settle.
pub(super) async fn read_partition(
    ctx: Arc<Ctx>,
    partition: String,
    version: i64,
    state: Arc<PartitionState>,
    stop: watch::Receiver<Phase>,
) {
    let mut r = Reader::new(ctx, partition, version, state, stop);
    loop {
        if *r.stop.borrow() != Phase::Running {
            break;
        }
        let Some(position) = r.resume_at().await else { continue };
        let (link, receiver) = match r.open(position).await {
            Ok(opened) => opened,
            Err(NotOpened::Retry) => continue,
            Err(NotOpened::Over) => break,
        };
        match r.session(link, receiver).await {
            Session::Over => break,
            Session::Reopen(pause) => tokio::time::sleep(pause).await,
        }
    }
    r.finish().await;
}

/// A partition reader's state, kept across its receivers: a receiver is reopened after a dropped
/// link, and what was read and handed over before still settles and checkpoints.
struct Reader {
    ctx: Arc<Ctx>,
    partition: String,
    pid: Arc<str>,
    version: i64,
    state: Arc<PartitionState>,
    stop: watch::Receiver<Phase>,
    to_reader: mpsc::UnboundedSender<Settled>,
    settled: mpsc::UnboundedReceiver<Settled>,
    book: Book,
    last_read: Option<i64>,
    tick: tokio::time::Interval,
    events_total: prometheus::IntCounter,
}

/// Why no receiver was opened.
enum NotOpened {
    /// Start over: the stop signal changed, or opening failed (after a pause).
    Retry,
    /// The partition is no longer read here.
    Over,
}

impl Reader {
    fn new(
        ctx: Arc<Ctx>,
        partition: String,
        version: i64,
        state: Arc<PartitionState>,
        stop: watch::Receiver<Phase>,
    ) -> Reader {
        let pid: Arc<str> = partition.as_str().into();
        let (to_reader, settled) = mpsc::unbounded_channel::<Settled>();
        let book = Book::default();
        let last_read: Option<i64> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(ctx.s.checkpoint_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let events_total = metrics::get().partition_events.with_label_values(&[&partition]);
        Reader { ctx, partition, pid, version, state, stop, to_reader, settled, book, last_read, tick, events_total }
    }

    /// Where the next receiver starts; `None` when the checkpoint could not be read (after a pause).
    async fn resume_at(&self) -> Option<StartPosition> {
        // From the checkpoint the first time; after a dropped link, from the last event read.
        match self.last_read {
            Some(seq) => Some(StartPosition { location: StartLocation::SequenceNumber(seq), inclusive: false }),
            None => match start_position(&self.ctx, &self.partition).await {
                Ok((p, cp)) => {
                    if let Some(c) = cp {
                        self.state.checkpoint.store(c.sequence_number, Ordering::Relaxed);
                    }
                    Some(p)
                }
                Err(e) => {
                    tracing::warn!(partition = %self.partition, error = %e, "cannot read the checkpoint; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    None
                }
            },
        }
    }

    async fn open(&mut self, position: StartPosition) -> Result<(OwnedMutexGuard<()>, EventReceiver), NotOpened> {
        let options = OpenReceiverOptions {
            owner_level: Some(self.version),
            prefetch: Some(self.ctx.s.max_in_flight.min(1000) as u32),
            start_position: Some(position),
            receive_timeout: None,
        };
        let link = tokio::select! {
            held = self.ctx.link_lock(&self.partition).lock_owned() => held,
            changed = self.stop.changed() => {
                if changed.is_err() {
                    return Err(NotOpened::Over);
                }
                return Err(NotOpened::Retry);
            }
        };
        let receiver = match self.ctx.consumer.open_receiver_on_partition(self.partition.clone(), Some(options)).await {
            Ok(r) => r,
            Err(e) => {
                if stolen(&e) {
                    tracing::info!(partition = %self.partition, "another instance took the partition (higher owner level)");
                    return Err(NotOpened::Over);
                }
                tracing::warn!(partition = %self.partition, error = %e, "cannot open a receiver on the partition; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
                return Err(NotOpened::Retry);
            }
        };
        Ok((link, receiver))
    }

    async fn session(&mut self, link: OwnedMutexGuard<()>, receiver: EventReceiver) -> Session {
        let mut events = Box::pin(receiver.stream_events());
        let ended = loop {
            let budget = self.ctx.intake.budget().clone();
            let spent = budget.spent();
            let taking =
                *self.stop.borrow() == Phase::Running && self.book.in_flight() < self.ctx.s.max_in_flight && !spent;
            tokio::select! {
                // The byte budget is shared with the other partitions: their settling makes room too.
                _ = budget.room(), if spent => {}
                next = events.next(), if taking => match next {
                    Some(Ok(event)) => {
                        self.events_total.inc();
                        if let Some(seq) = handle(&self.ctx, &self.pid, &event, &self.to_reader, &mut self.book) {
                            self.last_read = Some(seq);
                        }
                    }
                    Some(Err(e)) => {
                        if stolen(&e) {
                            tracing::info!(partition = %self.partition, "another instance took the partition (higher owner level)");
                            break Session::Over;
                        }
                        tracing::warn!(partition = %self.partition, error = %e, "partition receiver failed; reopening");
                        break Session::Reopen(Duration::from_secs(1));
                    }
                    None => break Session::Reopen(Duration::ZERO),
                },
                Some(s) = self.settled.recv() => settle(&self.ctx, s, &mut self.book).await,
                _ = self.tick.tick() => {
                    if !write_checkpoint(&self.ctx, &self.partition, self.version, &mut self.book, &self.state).await {
                        break Session::Over;
                    }
                }
                changed = self.stop.changed() => {
                    // Closed: the coordinator gave the partition up (lost to another instance).
                    if changed.is_err() || *self.stop.borrow() == Phase::Close {
                        break Session::Over;
                    }
                }
            }
        };
        // Closed, not just dropped: the client keeps a dropped receiver's link, and a later
        // receiver on this partition (it coming back to this instance) would find that stale,
        // stolen link, fail, and take the whole connection (every partition) into a loop of
        // recoveries.
        drop(events);
        // Briefly: on a stop, the last checkpoint is still to be written within the
        // coordinator's 5 s.
        match tokio::time::timeout(Duration::from_secs(1), receiver.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(partition = %self.partition, error = %e, "closing the partition receiver"),
            Err(_) => tracing::debug!(partition = %self.partition, "closing the partition receiver timed out"),
        }
        drop(link);
        ended
    }

    async fn finish(mut self) {
        // What was handed over still settles: book it (dead letters included), so that the counts
        // stay true and a stop does not wait for settlements nobody reads, then write the last
        // checkpoint (refused if the partition has a new owner). On a stop the pipeline has already
        // settled what it could; after a takeover the pipeline is still working on them.
        drop(self.to_reader);
        let closing = *self.stop.borrow() == Phase::Close;
        let deadline =
            tokio::time::Instant::now() + if closing { Duration::from_secs(5) } else { Duration::from_secs(600) };
        while self.book.in_flight() > 0 {
            match tokio::time::timeout_at(deadline, self.settled.recv()).await {
                Ok(Some(s)) => settle(&self.ctx, s, &mut self.book).await,
                _ => break,
            }
        }
        write_checkpoint(&self.ctx, &self.partition, self.version, &mut self.book, &self.state).await;
        metrics::get().checkpoint_lag.remove_label_values(&[&self.partition]).ok();
    }
}

/// How a receiver's session on a partition ended.
enum Session {
    /// The partition is no longer read here (stopped, closed, or taken by another instance).
    Over,
    /// The link failed or ended: a new receiver, after this pause, from the last event read.
    Reopen(Duration),
}

fn stolen(e: &azure_messaging_eventhubs::EventHubsError) -> bool {
    matches!(e.kind, azure_messaging_eventhubs::error::ErrorKind::ConsumerDisconnected(_))
}

/// Hands one event to the pipeline; its sequence number.
fn handle(
    ctx: &Ctx,
    pid: &Arc<str>,
    event: &ReceivedEventData,
    to_reader: &mpsc::UnboundedSender<Settled>,
    book: &mut Book,
) -> Option<i64> {
    let message = event.raw_amqp_message();
    let Some(seq) = event.sequence_number() else {
        // Event Hubs stamps every event; one without a position cannot be checkpointed in order,
        // so it is not taken (the peer at the other end is not Event Hubs).
        tracing::error!(partition = %pid, "an event without x-opt-sequence-number was not processed: the endpoint does not behave as Event Hubs");
        return None;
    };
    let at = Checkpoint {
        offset: event.offset().clone().unwrap_or_default(),
        sequence_number: seq,
        enqueued_time: event.enqueued_time().map(chrono::DateTime::<chrono::Utc>::from),
    };
    book.read(at.clone());
    crate::source::book_received();
    let bytes = body_len(message);
    let budget = ctx.intake.budget();
    let (lease, too_large) = budget.take(bytes);
    let record = Record { partition: pid.clone(), at, message: message.clone(), _lease: lease };
    let guard = DeliveryGuard::new(Position::new(record), sent_at(message), to_reader.clone());
    match too_large {
        // Never parsed: dead-lettered as it came, once the guard drops here.
        Some(why) => guard.fail(ErrorKind::MessageTooLarge, why),
        None => ctx.intake.accept(envelope(message), Arc::new(guard)),
    }
    Some(seq)
}

/// A settled event: dead-lettered first if it failed (retried until the dead-letter hub takes it:
/// the checkpoint cannot pass an event that is neither persisted nor dead-lettered).
async fn settle(ctx: &Ctx, s: Settled, book: &mut Book) {
    let Some(record) = s.position.into_inner::<Record>() else {
        tracing::error!("a settled delivery did not come from this source");
        return;
    };
    if let Status::DeadLettered(f) = &s.status {
        let mut wait = Duration::from_millis(200);
        loop {
            match dead_letter(ctx, &record, f).await {
                Ok(()) => {
                    book_dead_lettered(f.kind, &f.message);
                    break;
                }
                Err(e) => {
                    tracing::error!(kind = %f.kind, partition = %record.partition, error = %e, "could not send a dead letter to the dead-letter hub; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
    book.settled(record.at.sequence_number);
    book_settled(s.sent_at, s.received, true);
}

/// The original event to the dead-letter hub (retried by the caller until it takes it).
async fn dead_letter(ctx: &Ctx, r: &Record, f: &Failure) -> Result<(), EventHubsError> {
    let m = dead_letter_message(&r.message, f, &ctx.hub, &r.partition, r.at.sequence_number);
    ctx.dead_letters.send_message(m, None).await.map_err(|e| hub_error(&ctx.s.dead_letter_hub, e))
}

/// A dead letter: the original event's body, properties and application properties as they were,
/// the reason in `x-iomt-error-kind` / `x-iomt-error`, and where it came from.
/// `deadletters::restored` undoes this for a redrive.
pub(super) fn dead_letter_message(
    original: &AmqpMessage,
    f: &Failure,
    hub: &str,
    partition: &str,
    sequence_number: i64,
) -> AmqpMessage {
    let mut m = original.clone();
    let app = m.application_properties.get_or_insert_with(Default::default);
    app.0.insert(ERROR_KIND_PROPERTY.into(), AmqpSimpleValue::String(f.kind.as_str().into()));
    app.0.insert(ERROR_PROPERTY.into(), AmqpSimpleValue::String(f.message.clone()));
    app.0.insert(SOURCE_HUB_PROPERTY.into(), AmqpSimpleValue::String(hub.to_string()));
    app.0.insert(SOURCE_PARTITION_PROPERTY.into(), AmqpSimpleValue::String(partition.to_string()));
    app.0.insert(SOURCE_SEQUENCE_PROPERTY.into(), AmqpSimpleValue::Long(sequence_number));
    drop_service_stamps(&mut m);
    m
}

/// The service stamps its own x-opt-* annotations on the hub an event is sent to; the ones it
/// carries from where it was read would be stale there.
pub(super) fn drop_service_stamps(m: &mut AmqpMessage) {
    if let Some(a) = m.message_annotations.as_mut() {
        let stale: Vec<AmqpAnnotationKey> =
            a.0.iter().map(|(k, _)| k.clone()).filter(|k| annotation_key(k).starts_with("x-opt-")).collect();
        for k in stale {
            a.0.remove(&k);
        }
    }
}

/// Writes the checkpoint if it moved. `false` when this instance no longer owns the partition.
async fn write_checkpoint(ctx: &Ctx, partition: &str, version: i64, book: &mut Book, state: &PartitionState) -> bool {
    let Some(c) = book.take_unwritten() else { return true };
    match ctx.store.set_checkpoint(&ctx.me, version, partition, &c).await {
        Ok(true) => {
            state.checkpoint.store(c.sequence_number, Ordering::Relaxed);
            true
        }
        Ok(false) => {
            // Not ours any more (or already further): the new owner goes on from its own reading.
            match ctx.store.checkpoint(partition).await {
                Ok(Some(now)) if now.sequence_number >= c.sequence_number => true,
                _ => {
                    tracing::info!(partition = %partition, "checkpoint refused: the partition has a new owner");
                    false
                }
            }
        }
        Err(e) => {
            tracing::warn!(partition = %partition, error = %e, "could not write the checkpoint; retrying");
            book.unwrite(c);
            true
        }
    }
}
