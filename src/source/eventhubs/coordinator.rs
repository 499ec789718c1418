//! The coordinator: connects, balances partition ownership with the other instances each round,
//! and starts and stops a reader per partition it owns.

use super::client::{consumer, producer};
use super::context::{Ctx, Partitions, Phase};
use super::reader::read_partition;
use super::settings::EventHubs;
use super::store::{self, Scope};
use super::{EventHubsError, balance, hub_error};
use crate::metrics;
use crate::source::Intake;
use crate::status::{PartitionState, Shared};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::watch;

/// The running Event Hubs source.
pub struct Running {
    stop: watch::Sender<Phase>,
    coordinator: Option<tokio::task::JoinHandle<()>>,
}

#[async_trait::async_trait(?Send)]
impl crate::source::Running for Running {
    async fn stop_taking(&mut self) {
        let _ = self.stop.send(Phase::StopTaking);
    }

    /// Writes the final checkpoints and releases the partitions (for at most 10 s).
    async fn close(mut self: Box<Self>) {
        let _ = self.stop.send(Phase::Close);
        if let Some(c) = self.coordinator.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), c).await;
        }
    }
}

/// This instance's name in the ownership table.
fn instance_id(s: &EventHubs) -> String {
    if !s.instance_id.is_empty() {
        return s.instance_id.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "host".into());
    format!("{}-{}-{:04x}", host.trim(), std::process::id(), fastrand::u16(..))
}

pub fn start(settings: EventHubs, intake: Arc<dyn Intake>, shared: Arc<Shared>) -> Running {
    let (stop, stop_rx) = watch::channel(Phase::Running);
    let coordinator = actix_rt::spawn(coordinate(settings, intake, shared, stop_rx));
    Running { stop, coordinator: Some(coordinator) }
}

/// A partition this instance reads.
struct Owned {
    version: i64,
    /// Tells the reader to stop (lost, or the whole source stops).
    stop: watch::Sender<Phase>,
    reader: tokio::task::JoinHandle<()>,
}

async fn connect(
    s: &EventHubs,
    intake: &Arc<dyn Intake>,
    partitions: &Arc<Partitions>,
    me: &str,
) -> Result<(Ctx, Vec<String>), EventHubsError> {
    let hub = s.hub_name();
    let scope = Scope { namespace: s.namespace_host(), hub: hub.clone(), consumer_group: s.consumer_group.clone() };
    let store = store::open(s, scope).await?;
    let consumer = consumer(s, &hub).await?;
    let props = consumer.get_eventhub_properties().await.map_err(|e| hub_error(&hub, e))?;
    let dead_letters = producer(s, &s.dead_letter_hub).await?;
    tracing::info!(hub = %hub, partitions = props.partition_ids.len(), consumer_group = %s.consumer_group, instance = %me, "connected to the event hub");
    let ctx = Ctx {
        s: s.clone(),
        hub,
        me: me.to_string(),
        consumer,
        dead_letters,
        store,
        intake: intake.clone(),
        partitions: partitions.clone(),
        links: Default::default(),
    };
    Ok((ctx, props.partition_ids))
}

async fn coordinate(s: EventHubs, intake: Arc<dyn Intake>, shared: Arc<Shared>, mut stop: watch::Receiver<Phase>) {
    let me = instance_id(&s);
    let owned_view = Arc::new(Partitions::default());
    let _ = shared.source.set(owned_view.clone());
    let delay = Duration::from_secs(2);
    let (ctx, partitions) = loop {
        if *stop.borrow() != Phase::Running {
            return;
        }
        match connect(&s, &intake, &owned_view, &me).await {
            Ok((ctx, partitions)) => break (Arc::new(ctx), partitions),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_s = delay.as_secs(), "cannot reach the event hub or its checkpoint store; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    };
    shared.broker_connected.store(true, Ordering::SeqCst);
    let expiry = Duration::from_secs(s.ownership_expiry_secs);
    let mut owned: HashMap<String, Owned> = HashMap::new();
    let interval = Duration::from_secs(s.balance_interval_secs);
    let connected = tokio::time::Instant::now();
    let mut round = tokio::time::interval(interval);
    round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut dropped = false;
        tokio::select! {
            _ = round.tick() => {}
            changed = stop.changed() => dropped = changed.is_err(),
        }
        // The handle gone without a close: the process is ending; close as well.
        let phase = if dropped { Phase::Close } else { *stop.borrow() };
        if phase != Phase::Running {
            // Readers finish what they were handed, then checkpoint and end on Close.
            for o in owned.values() {
                let _ = o.stop.send(phase);
            }
            if phase == Phase::Close {
                for (p, o) in owned.drain() {
                    let _ = tokio::time::timeout(Duration::from_secs(5), o.reader).await;
                    if let Err(e) = ctx.store.release(&me, &p, o.version).await {
                        tracing::warn!(partition = %p, error = %e, "could not release the partition; it is taken over when its ownership expires");
                    }
                    ctx.partitions.0.remove(&p);
                }
                metrics::get().partitions_owned.set(0);
                return;
            }
            continue;
        }
        let claimed_free = balance_round(&ctx, &partitions, &mut owned, expiry).await;
        metrics::get().partitions_owned.set(owned.len() as i64);
        if claimed_free && connected.elapsed() >= interval {
            // Waiting a whole interval after each free claim would leave a lone instance reading
            // one more partition every interval (32 partitions at 5 s: almost three minutes). For
            // its first interval an instance claims one per round, so that instances starting
            // together see each other before they share the hub out; otherwise the first would
            // take everything and the others would steal, and each partition stolen is read again
            // from its checkpoint.
            round.reset_after(FREE_CLAIM_PAUSE);
        } else {
            lag(&ctx, &owned).await;
        }
    }
}

/// Between a round that claimed a free partition and the next: long enough for instances that
/// start together to see each other's claims, short enough that a hub is read in full at once.
const FREE_CLAIM_PAUSE: Duration = Duration::from_millis(100);

/// One round: drop readers that ended, renew, claim one partition if it is our turn. `true` when
/// it claimed, or raced another instance for, a partition nobody held.
async fn balance_round(
    ctx: &Arc<Ctx>,
    partitions: &[String],
    owned: &mut HashMap<String, Owned>,
    expiry: Duration,
) -> bool {
    let me = &ctx.me;
    owned.retain(|p, o| {
        let alive = !o.reader.is_finished();
        if !alive {
            tracing::info!(partition = %p, "partition reader ended; its ownership is given up");
            ctx.partitions.0.remove(p);
        }
        alive
    });
    let held: Vec<(String, i64)> = owned.iter().map(|(p, o)| (p.clone(), o.version)).collect();
    match ctx.store.renew(me, &held).await {
        Ok(kept) => {
            for (p, _) in held.iter().filter(|(p, _)| !kept.contains(p)) {
                tracing::info!(partition = %p, "partition taken over by another instance; stopping its reader");
                // Not Close: the reader still books what the pipeline settles of its events.
                if let Some(o) = owned.remove(p) {
                    let _ = o.stop.send(Phase::StopTaking);
                }
                ctx.partitions.0.remove(p);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not renew partition ownership");
            return false;
        }
    }
    let rows = match ctx.store.ownerships().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "could not read partition ownership");
            return false;
        }
    };
    let Some(claim) = balance::next_claim(me, partitions, &rows, expiry) else { return false };
    match ctx.store.claim(me, &claim).await {
        Ok(Some(version)) => {
            let from =
                rows.iter().find(|r| r.partition == claim.partition).map(|r| r.owner.clone()).unwrap_or_default();
            tracing::info!(partition = %claim.partition, owner_level = version, from = %from, "claimed a partition");
            let (stop, stop_rx) = watch::channel(Phase::Running);
            let state = PartitionState::new(&claim.partition, version);
            ctx.partitions.0.insert(claim.partition.clone(), state.clone());
            let reader = actix_rt::spawn(read_partition(ctx.clone(), claim.partition.clone(), version, state, stop_rx));
            owned.insert(claim.partition, Owned { version, stop, reader });
            claim.free
        }
        Ok(None) => {
            tracing::debug!(partition = %claim.partition, "another instance claimed it first");
            claim.free
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not claim a partition");
            false
        }
    }
}

/// Checkpoint lag per owned partition: events enqueued after the checkpoint.
async fn lag(ctx: &Ctx, owned: &HashMap<String, Owned>) {
    for p in owned.keys() {
        let Some(state) = ctx.partitions.0.get(p).map(|s| s.clone()) else { continue };
        if let Ok(props) = ctx.consumer.get_partition_properties(p).await {
            state.last_enqueued.store(props.last_enqueued_sequence_number, Ordering::Relaxed);
            let lag = (props.last_enqueued_sequence_number - state.checkpoint.load(Ordering::Relaxed)).max(0);
            metrics::get().checkpoint_lag.with_label_values(&[p]).set(lag);
        }
    }
}
