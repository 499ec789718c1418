//! Shard queues taken over from another instance (`broker.topology = "sharded"`): when this
//! instance stands by on each, and the grace a taken-over queue waits before its deliveries go to
//! the pipeline.
//!
//! Standing by: single-active-consumer hands a queue whose consumer went away to the waiting
//! consumer that registered first. Instances register on a queue in an order that rotates with the
//! queue, so a dead instance's queues spread over the survivors instead of all going to the one
//! that registered first everywhere.
//!
//! The grace: the previous consumer may have writes still in flight at the FHIR server; reading
//! before they land would make this one create over them. Only the taken-over queue waits: its
//! deliveries are taken in (booked, in the settler's order) and held; every other queue flows.

use super::{Consumer, Received};
use crate::source::rabbitmq::settings::{Broker, Topology};
use crate::status::QueueState;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Between one instance's turn to stand by on a queue and the next one's: long enough that
/// instances started together register in the intended order.
const STANDBY_STEP: Duration = Duration::from_secs(1);

/// When, after `first` (the pause before standing by at all), this instance stands by on each of
/// `standby`: queue `k` of owner `o = k % n` is stood by for by the other instances in the order
/// `o+1+j, o+2+j, ...` (skipping `o`, `j = k / n`), so the owner's queues go to different survivors.
pub(super) fn standby_schedule(
    b: &Broker,
    standby: &[Arc<QueueState>],
    first: Duration,
) -> Vec<(Duration, Arc<QueueState>)> {
    let n = b.instances.max(1);
    let mut schedule: Vec<(Duration, Arc<QueueState>)> = standby
        .iter()
        .map(|q| {
            let k = (0..b.shard_queues).find(|k| *super::super::shard_queue(b, *k) == *q.name);
            let rank = k.map_or(0, |k| standby_rank(b.instance, k, n));
            (first + STANDBY_STEP * rank, q.clone())
        })
        .collect();
    schedule.sort_by_key(|(at, _)| *at);
    schedule
}

/// This instance's place among the instances standing by on queue `k` (0: first).
fn standby_rank(instance: u16, k: u16, n: u16) -> u32 {
    if n < 2 {
        return 0;
    }
    let (owner, j) = (k % n, k / n);
    let distance = (instance + n - owner - 1) % n;
    u32::from((distance + (n - 1) - j % (n - 1)) % (n - 1))
}

/// The taken-over queues whose grace is running, and their deliveries waiting in order.
pub(super) struct Grace {
    length: Duration,
    sharded: bool,
    /// Queues whose first delivery of this session was looked at.
    looked_at: HashSet<Arc<str>>,
    waiting: HashMap<Arc<str>, (Instant, VecDeque<Received>)>,
}

impl Grace {
    pub(super) fn new(b: &Broker) -> Grace {
        Grace {
            length: Duration::from_millis(b.takeover_grace_ms),
            sharded: b.topology == Topology::Sharded,
            looked_at: HashSet::new(),
            waiting: HashMap::new(),
        }
    }

    /// Takes the delivery in and holds it when its queue is in its grace; `None` when it was
    /// held, else the delivery to hand over now.
    pub(super) fn admit(&mut self, queue: &QueueState, redelivered: bool, r: Received) -> Option<Received> {
        if let Some((_, held)) = self.waiting.get_mut(&queue.name) {
            held.push_back(r);
            return None;
        }
        // Only a shard queue's first delivery of the session tells whether it was taken over.
        if !self.sharded || !self.looked_at.insert(queue.name.clone()) || !redelivered || self.length.is_zero() {
            return Some(r);
        }
        tracing::info!(queue = %queue.name, grace_ms = self.length.as_millis() as u64, "taking over a shard queue; its deliveries wait for its previous consumer's writes to land");
        self.waiting.insert(queue.name.clone(), (Instant::now() + self.length, VecDeque::from([r])));
        None
    }

    /// When the next grace ends.
    pub(super) fn next_end(&self) -> Option<Instant> {
        self.waiting.values().map(|(until, _)| *until).min()
    }

    /// Hands over, in order, the deliveries of every queue whose grace has ended.
    pub(super) fn release_ended(&mut self, consumer: &Consumer) {
        let now = Instant::now();
        let ended: Vec<Arc<str>> =
            self.waiting.iter().filter(|(_, (t, _))| *t <= now).map(|(q, _)| q.clone()).collect();
        for q in ended {
            if let Some((_, held)) = self.waiting.remove(&q) {
                tracing::info!(queue = %q, deliveries = held.len(), "the takeover grace is over; handing the queue's deliveries over");
                held.into_iter().for_each(|r| consumer.hand_over(r));
            }
        }
    }

    /// Hands over everything still waiting (the session ends: a stop writes what it holds).
    pub(super) fn release_all(&mut self, consumer: &Consumer) {
        for (_, (_, held)) in self.waiting.drain() {
            held.into_iter().for_each(|r| consumer.hand_over(r));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_instances_queues_go_to_different_survivors() {
        // 3 instances, 6 queues: queue k belongs to instance k % 3.
        for owner in 0..3u16 {
            let queues: Vec<u16> = (0..6).filter(|k| k % 3 == owner).collect();
            let firsts: HashSet<u16> = queues
                .iter()
                .map(|&k| (0..3).filter(|&i| i != owner).find(|&i| standby_rank(i, k, 3) == 0).unwrap_or(99))
                .collect();
            assert_eq!(firsts.len(), 2, "instance {owner}'s queues {queues:?} each go to another survivor");
            for &k in &queues {
                let mut ranks: Vec<u32> = (0..3).filter(|&i| i != owner).map(|i| standby_rank(i, k, 3)).collect();
                ranks.sort();
                assert_eq!(ranks, [0, 1], "queue {k}: one order of the standing-by instances");
            }
        }
    }
}
