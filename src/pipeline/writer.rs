//! The FhirWriter actor: turns groups into Observations and persists them. A writer handles one batch
//! at a time, and a device always goes to the same writer, so a device's writes stay in order.
//!
//! Per batch: resolve identities (IdentityCache), read the Observations of the windows it does not
//! hold yet (`GET Observation/{id}`: ids are deterministic), merge, and write the changed ones in
//! one batch Bundle of `PUT`s with `If-Match`. A 409/412 means someone else wrote first: re-read,
//! re-merge, retry. Anything else the server refuses fails the group with its OperationOutcome;
//! what cannot be written for now (network, timeouts, 408, 429, 5xx; identity lookups too) is *held*:
//! the writer waits (the server's `Retry-After`, else a capped backoff, cut short when the circuit
//! closes) and runs the held groups again, for as long as it takes unless `fhir.give_up_after_secs`
//! bounds it. Held messages stay unacked, so the prefetch window fills and the broker stops sending:
//! the broker is the buffer. A failed group marks its messages for the dead-letter queue; they are
//! acked only after that.

use super::Counted;
use super::identity::{IdentityCache, IdentityError, IdentityKey, Resolve, fhir_kind};
use super::mappings::Mappings;
use crate::fhir::{FhirError, FhirStore, Put, PutResult};
use crate::metrics;
use crate::model::group::Group;
use crate::model::kind::ErrorKind;
use crate::model::observation::{self, Identity, Observation, Outcome};
use crate::source::DeliveryGuard;
use crate::status::ActorStats;
use crate::template::fhir::CodeValueTemplate;
use actix::prelude::*;
use futures_util::FutureExt;
use futures_util::future::join_all;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A group and the deliveries it came from.
pub struct PendingGroup {
    pub group: Group,
    pub guards: Vec<Arc<DeliveryGuard>>,
    /// The mappings in force when the group's first message arrived: it is written with them.
    pub mappings: Arc<Mappings>,
    /// When the server first could not take it: what `fhir.give_up_after_secs` counts from.
    held_since: Option<Instant>,
}

impl PendingGroup {
    pub fn new(group: Group, guards: Vec<Arc<DeliveryGuard>>, mappings: Arc<Mappings>) -> PendingGroup {
        PendingGroup { group, guards, mappings, held_since: None }
    }

    fn fail(&self, kind: ErrorKind, message: &str) {
        for g in &self.guards {
            g.fail(kind, message);
        }
    }
}

/// Groups the server could not take for now, and what it said.
#[derive(Default)]
struct Held {
    groups: Vec<PendingGroup>,
    retry_after: Option<Duration>,
    reason: Option<String>,
}

impl Held {
    /// Holds a group that failed transiently; fails (for the dead-letter queue) one that failed
    /// for good.
    fn settle(&mut self, pending: PendingGroup, e: &FhirError) {
        if !e.retryable() {
            pending.fail(fhir_kind(e), &e.to_string());
            return;
        }
        if let Some(r) = e.retry_after() {
            self.retry_after = Some(self.retry_after.map_or(r, |h| h.max(r)));
        }
        self.reason = Some(e.summary());
        self.groups.push(pending);
    }
}

/// What a writer holds between rounds, by device: a held device's later groups wait behind its
/// held ones (its writes stay in order) while every other device's groups are written as they
/// come. All of it is tried again together once the wait is over.
#[derive(Default)]
struct Holding {
    /// Held groups, and the later groups of their devices, in the order they came.
    groups: Vec<PendingGroup>,
    devices: HashSet<String>,
    retry_after: Option<Duration>,
    reason: String,
    /// Rounds tried in a row without the writer's hold emptying: the backoff doubles with each.
    round: u32,
    /// A retry is scheduled.
    waiting: bool,
    /// What this writer added to `iomt_held_groups`.
    counted: usize,
}

impl Holding {
    fn holds(&self, p: &PendingGroup) -> bool {
        self.devices.contains(&p.group.key.device_id)
    }

    fn push(&mut self, p: PendingGroup) {
        self.devices.insert(p.group.key.device_id.clone());
        self.groups.push(p);
    }
}

pub struct WriteBatch {
    pub groups: Vec<PendingGroup>,
}

impl Message for WriteBatch {
    type Result = ();
}

/// Observations this writer last read or wrote, by id (`None`: the server has none).
#[derive(Default)]
struct Stored {
    map: HashMap<String, Option<Known>>,
}

impl Stored {
    fn trim(&mut self) {
        let bytes: usize = self.map.values().flatten().map(Known::size).sum();
        if bytes > CACHE_BYTES {
            self.map.clear();
        }
    }
}

struct Known {
    version: Option<String>,
    obs: Observation,
}

impl Known {
    /// About what the entry holds: the SampledData strings dominate.
    fn size(&self) -> usize {
        let data = |v: &observation::ObservationValue| {
            v.value_sampled_data.as_ref().and_then(|s| s.data.as_ref()).map_or(0, String::len)
        };
        1024 + data(&self.obs.value) + self.obs.component.iter().map(|c| data(&c.value)).sum::<usize>()
    }
}

/// Bytes of Observations kept before the cache starts over (a miss costs one read).
const CACHE_BYTES: usize = 64 << 20;
/// Re-read-and-merge rounds after a 409/412 before the group fails.
const CONFLICT_ROUNDS: usize = 3;

pub struct FhirWriter {
    /// The FHIR server, the dry run, or a test's in-memory server.
    store: Arc<dyn FhirStore>,
    identity: Counted<IdentityCache>,
    batch: bool,
    /// Taken by the batch being written (batches are written one at a time).
    stored: Option<Stored>,
    /// Groups received since the last write: the shards' flushes of one tick become one write.
    pending: Vec<PendingGroup>,
    scheduled: bool,
    /// When the last write round ended: what arrives right after one was queued during it.
    round_ended: Option<Instant>,
    stats: Arc<ActorStats>,
    /// Hold groups at most this long through an outage (`fhir.give_up_after_secs`); `None`: forever.
    give_up: Option<Duration>,
    holding: Holding,
}

/// How long a writer gathers the shards' flushes before writing them as one batch.
const GATHER: Duration = Duration::from_millis(20);

impl FhirWriter {
    pub fn new(
        store: Arc<dyn FhirStore>,
        identity: Counted<IdentityCache>,
        batch: bool,
        stats: Arc<ActorStats>,
        give_up: Option<Duration>,
    ) -> Self {
        FhirWriter {
            store,
            identity,
            batch,
            stored: Some(Stored::default()),
            pending: Vec::new(),
            scheduled: false,
            round_ended: None,
            stats,
            give_up,
            holding: Holding::default(),
        }
    }

    fn work(&self) -> Work {
        Work { store: self.store.clone(), identity: self.identity.clone(), batch: self.batch }
    }

    /// An idle writer gathers for `GATHER` first; groups that queued up while a round was being
    /// written go at once (the rest of the queue is taken into the same round), so a busy writer
    /// keeps the FHIR server busy instead of pausing between rounds.
    fn schedule(&mut self, ctx: &mut Context<Self>) {
        if !self.scheduled && !self.pending.is_empty() {
            self.scheduled = true;
            let busy = self.round_ended.is_some_and(|t| t.elapsed() < GATHER);
            ctx.run_later(if busy { Duration::ZERO } else { GATHER }, |act, ctx| act.write_pending(ctx));
        }
    }

    /// Writes what has gathered, but for the groups of held devices (they wait behind their held
    /// groups). The actor takes no other message until the round is written (`wait`): rounds go
    /// one at a time, so a device's writes stay in order. A round never waits for the server to
    /// come back: what it could not write is held apart, and the next round goes ahead without it.
    fn write_pending(&mut self, ctx: &mut Context<Self>) {
        self.scheduled = false;
        let mut groups = std::mem::take(&mut self.pending);
        if !self.holding.devices.is_empty() {
            let (behind, free): (Vec<_>, Vec<_>) = groups.into_iter().partition(|p| self.holding.holds(p));
            behind.into_iter().for_each(|p| self.holding.push(p));
            groups = free;
        }
        if groups.is_empty() {
            return;
        }
        let Some(mut stored) = self.stored.take() else {
            // Not reached (rounds run one at a time); should it be, the groups wait for the next.
            self.pending = groups;
            return;
        };
        let work = self.work();
        let fut = async move {
            // Should anything in the round panic, its messages are dead-lettered, never acked.
            let guards: Vec<Arc<DeliveryGuard>> = groups.iter().flat_map(|g| g.guards.iter().cloned()).collect();
            let held = match std::panic::AssertUnwindSafe(work.run(&mut stored, groups)).catch_unwind().await {
                Ok(held) => held,
                Err(_) => {
                    tracing::error!(
                        groups = guards.len(),
                        "a write batch failed with an internal error; its messages are dead-lettered"
                    );
                    for g in &guards {
                        g.fail(
                            ErrorKind::Internal,
                            "the FHIR writer failed with an internal error while writing this message's data",
                        );
                    }
                    stored = Stored::default();
                    Held::default()
                }
            };
            (stored, held)
        };
        ctx.wait(fut.into_actor(self).map(|(mut stored, held), act, ctx| {
            stored.trim();
            act.stats.set_devices(stored.map.len());
            act.stats.flushed();
            act.stored = Some(stored);
            act.round_ended = Some(Instant::now());
            act.hold(held, ctx);
            act.schedule(ctx);
        }));
    }

    /// Keeps what a round could not write until the server's `Retry-After` or the backoff is over.
    fn hold(&mut self, held: Held, ctx: &mut Context<Self>) {
        if held.groups.is_empty() {
            if self.holding.groups.is_empty() {
                self.holding.round = 0;
            }
            return;
        }
        metrics::get().held_groups.add(held.groups.len() as i64);
        self.holding.counted += held.groups.len();
        let now = Instant::now();
        for mut p in held.groups {
            p.held_since.get_or_insert(now);
            self.holding.push(p);
        }
        if let Some(r) = held.retry_after {
            self.holding.retry_after = Some(self.holding.retry_after.map_or(r, |h| h.max(r)));
        }
        self.holding.reason = held.reason.unwrap_or_default();
        if !self.holding.waiting {
            self.holding.waiting = true;
            let (work, round, retry_after) = (self.work(), self.holding.round, self.holding.retry_after.take());
            let wait = async move { work.wait(round, retry_after).await };
            ctx.spawn(wait.into_actor(self).map(|(), act, ctx| act.retry(ctx)));
        }
    }

    /// The wait is over: the held groups go first into the next round, but those held longer than
    /// `fhir.give_up_after_secs`, which are dead-lettered.
    fn retry(&mut self, ctx: &mut Context<Self>) {
        let holding = std::mem::take(&mut self.holding);
        self.holding.round = holding.round.saturating_add(1);
        let mut groups = holding.groups;
        metrics::get().held_groups.sub(holding.counted as i64);
        if let Some(bound) = self.give_up {
            let text = format!(
                "the FHIR server was unavailable for longer than fhir.give_up_after_secs ({} s): {}",
                bound.as_secs(),
                holding.reason
            );
            groups.retain(|p| {
                let expired = p.held_since.is_some_and(|t| t.elapsed() >= bound);
                if expired {
                    p.fail(ErrorKind::FhirUnavailable, &text);
                }
                !expired
            });
        }
        groups.append(&mut self.pending);
        self.pending = groups;
        self.schedule(ctx);
    }
}

impl Actor for FhirWriter {
    type Context = Context<Self>;
}

impl Handler<WriteBatch> for FhirWriter {
    type Result = ();

    fn handle(&mut self, msg: WriteBatch, ctx: &mut Context<Self>) {
        self.stats.received();
        self.pending.extend(msg.groups);
        self.schedule(ctx);
    }
}

struct Work {
    store: Arc<dyn FhirStore>,
    identity: Counted<IdentityCache>,
    batch: bool,
}

/// The first pause before held groups are tried again; it doubles each round up to
/// `fhir.max_backoff_ms`, and ends early when the circuit closes.
const HOLD_FIRST_DELAY: Duration = Duration::from_millis(500);

/// A group ready to be written, with what it is written with.
struct Item {
    pending: PendingGroup,
    identity: Identity,
    /// The id of the group's Observation (a hash, computed once).
    id: String,
}

impl Item {
    fn new(pending: PendingGroup, identity: Identity) -> Item {
        let id = observation::identifier(&pending.group, &identity).1;
        Item { pending, identity, id }
    }
}

/// One Observation to write and the groups merged into it.
struct Write {
    id: String,
    /// An instant window: written once, rarely again, so not kept in the cache.
    instant: bool,
    obs: Observation,
    if_match: Option<String>,
    items: Vec<Item>,
}

impl Write {
    fn fail(&self, kind: ErrorKind, message: &str) {
        for i in &self.items {
            i.pending.fail(kind, message);
        }
    }
}

/// The group's FHIR template, from the mappings it was grouped with.
fn template(p: &PendingGroup) -> Option<&CodeValueTemplate> {
    p.mappings.fhir.template(&p.group.key.type_name)
}

fn is_instant(item: &Item) -> bool {
    matches!(item.pending.group.key.window, crate::model::group::Window::Instant(_))
}

fn count_written(w: &Write) {
    let outcome = if w.if_match.is_some() { "updated" } else { "created" };
    metrics::get().observations.with_label_values(&[outcome]).inc();
}

/// The server holds the write at `version`: counted, and kept for the next merge (but instants).
/// Its groups' guards drop with it, which acks their messages once nothing else holds them.
fn written(stored: &mut Stored, w: Write, version: Option<String>) {
    count_written(&w);
    if w.instant {
        stored.map.remove(&w.id);
    } else {
        stored.map.insert(w.id, Some(Known { version, obs: w.obs }));
    }
}

impl Work {
    /// Writes the groups; returns those the server could not take for now.
    async fn run(&self, stored: &mut Stored, groups: Vec<PendingGroup>) -> Held {
        let mut held = Held::default();
        let items = self.identities(groups, &mut held).await;
        let items = self.read_missing(stored, items, &mut held).await;
        let writes = self.merge(stored, items);
        let conflicts = self.send(stored, writes, &mut held).await;
        self.resolve_conflicts(stored, conflicts, &mut held).await;
        // "Not on the server" is only true for a moment: re-read next time rather than create blind.
        stored.map.retain(|_, k| k.is_some());
        held
    }

    /// Before held groups are tried again: the server's `Retry-After` (capped by
    /// `fhir.max_backoff_ms`) in full, else a doubling backoff that the circuit's closing cuts short.
    async fn wait(&self, round: u32, retry_after: Option<Duration>) {
        let cap = self.store.max_backoff();
        let m = metrics::get();
        let started = Instant::now();
        match retry_after {
            Some(r) => {
                // Never a tight loop, whatever the server says (`Retry-After: 0`, a past date).
                tokio::time::sleep(r.max(HOLD_FIRST_DELAY).min(cap)).await;
                m.fhir_wait_seconds.with_label_values(&["retry-after"]).inc_by(started.elapsed().as_secs_f64());
            }
            None => {
                let delay = HOLD_FIRST_DELAY.saturating_mul(1 << round.min(16)).min(cap);
                self.store.circuit().wait(delay).await;
                m.fhir_wait_seconds.with_label_values(&["backoff"]).inc_by(started.elapsed().as_secs_f64());
            }
        }
    }

    /// The stored Observations of `ids`, in one batch read or one read each.
    async fn read_all(&self, ids: &[String]) -> Vec<Result<Option<crate::fhir::Versioned>, FhirError>> {
        if self.batch {
            match self.store.read_many("Observation", ids).await {
                Ok(r) => r,
                Err(e) => ids.iter().map(|_| Err(e.clone())).collect(),
            }
        } else {
            join_all(ids.iter().map(|id| self.store.read("Observation", id))).await
        }
    }

    async fn identities(&self, groups: Vec<PendingGroup>, held: &mut Held) -> Vec<Item> {
        let asks = groups.iter().map(|p| {
            let k = &p.group.key;
            self.identity.send(Resolve(IdentityKey {
                device_id: k.device_id.clone(),
                patient_id: k.patient_id.clone(),
                encounter_id: k.encounter_id.clone(),
            }))
        });
        let answers = join_all(asks).await;
        let mut items = Vec::with_capacity(groups.len());
        for (pending, answer) in groups.into_iter().zip(answers) {
            match answer {
                Ok(Ok(identity)) => items.push(Item::new(pending, identity)),
                Ok(Err(IdentityError::Fhir(e))) => held.settle(pending, &e),
                Ok(Err(e)) => pending.fail(e.kind(), &e.to_string()),
                Err(e) => pending.fail(ErrorKind::Internal, &format!("the identity actor did not answer: {e}")),
            }
        }
        items
    }

    /// Reads the stored Observation of every window not in the cache.
    async fn read_missing(&self, stored: &mut Stored, items: Vec<Item>, held: &mut Held) -> Vec<Item> {
        let mut ids: Vec<String> =
            items.iter().map(|i| i.id.clone()).filter(|id| !stored.map.contains_key(id)).collect();
        ids.sort();
        ids.dedup();
        let reads = self.read_all(&ids).await;
        let mut failed: HashMap<String, FhirError> = HashMap::new();
        for (id, r) in ids.into_iter().zip(reads) {
            match r {
                Ok(None) => {
                    stored.map.insert(id, None);
                }
                Ok(Some(v)) => match serde_json::from_value::<Observation>(v.resource) {
                    Ok(obs) => {
                        stored.map.insert(id, Some(Known { version: v.version, obs }));
                    }
                    Err(e) => {
                        let msg = format!(
                            "Observation/{id} on the server is not an Observation this connector can merge into: {e}"
                        );
                        failed
                            .insert(id, FhirError::Decode { method: "GET", path: "Observation".into(), message: msg });
                    }
                },
                Err(e) => {
                    failed.insert(id, e);
                }
            }
        }
        let mut readable = Vec::with_capacity(items.len());
        for i in items {
            match failed.get(&i.id) {
                Some(e) => held.settle(i.pending, e),
                None => readable.push(i),
            }
        }
        readable
    }

    /// Builds or merges each group; groups of one window are merged into one write.
    fn merge(&self, stored: &Stored, items: Vec<Item>) -> Vec<Write> {
        let now = chrono::Utc::now();
        let mut writes: Vec<Write> = Vec::new();
        let mut by_id: HashMap<String, usize> = HashMap::new();
        for item in items {
            let Some(template) = template(&item.pending) else {
                item.pending.fail(
                    ErrorKind::NoFhirTemplate,
                    &format!("no FHIR template has typeName '{}'", item.pending.group.key.type_name),
                );
                continue;
            };
            let id = item.id.clone();
            let (existing, version) = match by_id.get(&id) {
                Some(&w) => (Some(&writes[w].obs), writes[w].if_match.clone()),
                None => match stored.map.get(&id) {
                    Some(Some(k)) => (Some(&k.obs), k.version.clone()),
                    _ => (None, None),
                },
            };
            match observation::build_or_merge(template, &item.pending.group, &item.identity, existing, now) {
                Ok(Outcome::Create(obs) | Outcome::Update(obs)) => match by_id.get(&id) {
                    Some(&w) => {
                        writes[w].obs = obs;
                        writes[w].items.push(item);
                    }
                    None => {
                        by_id.insert(id.clone(), writes.len());
                        writes.push(Write {
                            id,
                            instant: is_instant(&item),
                            obs,
                            if_match: version,
                            items: vec![item],
                        });
                    }
                },
                // Nothing new on top of a write already in this batch: the group is persisted
                // with that write, and acked only after it.
                Ok(Outcome::Unchanged) if by_id.contains_key(&id) => {
                    if let Some(&w) = by_id.get(&id) {
                        writes[w].items.push(item);
                    }
                }
                Ok(Outcome::Unchanged) => metrics::get().observations.with_label_values(&["unchanged"]).inc(),
                Err(e) => item.pending.fail(e.kind(), &e.to_string()),
            }
        }
        writes
    }

    /// Writes; returns the writes that met a conflict (409/412).
    async fn send(&self, stored: &mut Stored, writes: Vec<Write>, held: &mut Held) -> Vec<Write> {
        if writes.is_empty() {
            return writes;
        }
        let mut puts = Vec::with_capacity(writes.len());
        let mut ready = Vec::with_capacity(writes.len());
        for w in writes {
            match serde_json::to_value(w.obs.for_write()) {
                Ok(resource) => {
                    puts.push(Put {
                        resource_type: "Observation",
                        id: w.id.clone(),
                        resource,
                        if_match: w.if_match.clone(),
                    });
                    ready.push(w);
                }
                // Cannot happen for the types built here; the group fails loudly rather than vanish.
                Err(e) => w.fail(ErrorKind::Internal, &format!("Observation/{} could not be serialized: {e}", w.id)),
            }
        }
        let writes = ready;
        let results: Vec<Result<PutResult, FhirError>> = if self.batch && puts.len() > 1 {
            self.store.batch(&puts).await
        } else {
            join_all(puts.iter().map(|p| self.store.update(p.resource_type, &p.id, &p.resource, p.if_match.as_deref())))
                .await
        };
        let mut conflicts = Vec::new();
        let mut unconfirmed = Vec::new();
        for (w, r) in writes.into_iter().zip(results) {
            match r {
                // A success with no version in it is no evidence of a write: read it back.
                Ok(PutResult { status: s @ 200..=299, version: None, .. }) => {
                    stored.map.remove(&w.id);
                    let created_as_update = s == 200 && w.if_match.is_none();
                    unconfirmed.push((w, created_as_update));
                }
                Ok(PutResult { status: 200, version: Some(v), .. }) if w.if_match.is_none() => {
                    self.created_as_update(stored, w, v, held, &mut conflicts).await
                }
                Ok(PutResult { status: 200..=299, version, .. }) => written(stored, w, version),
                Ok(PutResult { status: 409 | 412, .. }) => {
                    stored.map.remove(&w.id);
                    conflicts.push(w);
                }
                Ok(PutResult { status, outcome, .. }) => {
                    stored.map.remove(&w.id);
                    let text =
                        format!("PUT Observation/{} returned HTTP {status}: {}", w.id, outcome.unwrap_or_default());
                    w.fail(ErrorKind::FhirRejected, &text);
                }
                Err(e) => {
                    stored.map.remove(&w.id);
                    w.items.into_iter().for_each(|i| held.settle(i.pending, &e));
                }
            }
        }
        conflicts.extend(self.confirm(stored, unconfirmed, held).await);
        conflicts
    }

    /// Someone wrote the window's Observation since it was read: read it again, merge again, write
    /// again, a few rounds.
    async fn resolve_conflicts(&self, stored: &mut Stored, mut conflicts: Vec<Write>, held: &mut Held) {
        for _ in 0..CONFLICT_ROUNDS {
            if conflicts.is_empty() {
                return;
            }
            let items: Vec<Item> = conflicts.drain(..).flat_map(|w| w.items).collect();
            let items = self.read_missing(stored, items, held).await;
            let writes = self.merge(stored, items);
            conflicts = self.send(stored, writes, held).await;
        }
        for w in conflicts {
            w.fail(
                ErrorKind::FhirConflict,
                &format!("Observation/{} kept changing under this writer ({CONFLICT_ROUNDS} rounds of 409/412)", w.id),
            );
        }
    }
}

/// What a write's answer proves: the read-back of writes answered without a version, and the
/// history after a create answered 200.
#[path = "writer_evidence.rs"]
mod evidence;

#[cfg(test)]
#[path = "writer_tests.rs"]
mod tests;
