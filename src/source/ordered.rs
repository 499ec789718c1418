//! The in-order settle rule every source follows, apart from any broker: deliveries are read in
//! order and settled by the pipeline in any order (shards and writers finish when they finish);
//! the source may only release (ack, checkpoint) the run of settled deliveries from the oldest one
//! read. A restart then reads again from the oldest delivery not yet persisted or dead-lettered,
//! never past it. RabbitMQ acks each released run with one `multiple` ack; Event Hubs moves its
//! checkpoint to the run's end. The model is vector's ordered finalizer: the status knows nothing
//! of the broker, and the ack stays in the source.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Deliveries between reading and release, by their position in the source (`P`: RabbitMQ's
/// (session, tag), an Event Hubs partition's sequence number); `T` is what a settled one carries.
pub struct InOrder<P, T> {
    /// Read and not yet released: `Some` once settled.
    open: BTreeMap<P, Option<T>>,
    /// Settled deliveries waiting behind an unsettled one, by when they settled: oldest first.
    by_age: VecDeque<(Instant, P)>,
    /// How many of `open` are settled.
    settled: usize,
}

impl<P, T> Default for InOrder<P, T> {
    fn default() -> Self {
        InOrder { open: BTreeMap::new(), by_age: VecDeque::new(), settled: 0 }
    }
}

impl<P: Ord + Copy, T> InOrder<P, T> {
    /// A delivery was read (handed to the pipeline).
    pub fn read(&mut self, p: P) {
        self.open.entry(p).or_insert(None);
    }

    /// A delivery was settled; `Err(item)` when its position is not open (never read, or voided
    /// by `clear`): the source cannot release it.
    pub fn settle(&mut self, p: P, item: T, now: Instant) -> Result<(), T> {
        match self.open.get_mut(&p) {
            Some(slot @ None) => {
                *slot = Some(item);
                self.settled += 1;
                self.by_age.push_back((now, p));
                Ok(())
            }
            _ => Err(item),
        }
    }

    /// A delivery released on its own (returned to the broker): nothing waits for it any more.
    pub fn forget(&mut self, p: P) {
        if let Some(Some(_)) = self.open.remove(&p) {
            self.settled -= 1;
        }
    }

    /// The run of settled deliveries from the oldest read, in order: released.
    pub fn release(&mut self) -> Vec<T> {
        let mut run = Vec::new();
        while let Some(first) = self.open.first_entry() {
            if first.get().is_none() {
                break;
            }
            if let Some(item) = first.remove() {
                self.settled -= 1;
                run.push(item);
            }
        }
        if !self.is_waiting() {
            self.by_age.clear();
        } else if self.by_age.len() > 2 * self.settled + 64 {
            // Entries of released deliveries linger until the oldest waiter leaves; a source that
            // never asks for stragglers (Event Hubs) would keep them for good.
            let open = &self.open;
            self.by_age.retain(|(_, p)| matches!(open.get(p), Some(Some(_))));
        }
        run
    }

    /// Deliveries read and not yet released.
    pub fn in_flight(&self) -> usize {
        self.open.len()
    }

    /// Whether a settled delivery waits behind an unsettled one.
    pub fn is_waiting(&self) -> bool {
        self.settled > 0
    }

    /// When the oldest waiter will have waited `after` (an entry released in order since only
    /// makes the caller look one wake-up early).
    pub fn next_straggler(&self, after: Duration) -> Option<Instant> {
        self.by_age.front().map(|(at, _)| *at + after)
    }

    /// What has waited `after` since it settled, released out of order (RabbitMQ acks each on its
    /// own rather than hold it behind a slow delivery).
    pub fn stragglers(&mut self, now: Instant, after: Duration) -> Vec<T> {
        let mut out = Vec::new();
        while let Some(&(at, p)) = self.by_age.front() {
            if now.duration_since(at) < after {
                break;
            }
            self.by_age.pop_front();
            // Released in order since: nothing left to do.
            if let Some(Some(_)) = self.open.get(&p)
                && let Some(Some(item)) = self.open.remove(&p)
            {
                self.settled -= 1;
                out.push(item);
            }
        }
        out
    }

    /// Everything open is void (the broker session it belongs to is gone): the settled items, to
    /// be counted as not released; what is unsettled will find its position closed.
    pub fn clear(&mut self) -> Vec<T> {
        self.by_age.clear();
        self.settled = 0;
        std::mem::take(&mut self.open).into_values().flatten().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(1);

    fn book(read: std::ops::RangeInclusive<u64>, settled: &[u64], at: Instant) -> InOrder<u64, u64> {
        let mut b = InOrder::default();
        read.for_each(|p| b.read(p));
        for &p in settled {
            assert!(b.settle(p, p, at).is_ok());
        }
        b
    }

    #[test]
    fn a_run_is_released_from_the_oldest_and_waits_behind_one_in_flight() {
        let t0 = Instant::now();
        let mut b = book(1..=5, &[1, 2, 4, 5], t0);
        assert_eq!(b.release(), vec![1, 2]);
        assert_eq!(b.release(), Vec::<u64>::new(), "4 and 5 wait for 3");
        assert_eq!(b.in_flight(), 3);
        assert!(b.settle(3, 3, t0).is_ok());
        assert_eq!(b.release(), vec![3, 4, 5]);
        assert!(!b.is_waiting());
        assert_eq!(b.in_flight(), 0);
    }

    #[test]
    fn the_release_waits_for_the_oldest_and_then_jumps_over_every_settled_one() {
        let t0 = Instant::now();
        let mut b = book(10..=14, &[12, 11], t0);
        assert!(b.release().is_empty(), "10 is still being processed");
        assert_eq!(b.in_flight(), 5);
        assert!(b.settle(10, 10, t0).is_ok());
        assert_eq!(b.release(), vec![10, 11, 12]);
        assert_eq!(b.in_flight(), 2);
    }

    #[test]
    fn a_straggler_wait_counts_from_when_each_delivery_settled() {
        let t0 = Instant::now();
        let mut b = book(1..=3, &[2], t0);
        assert!(b.settle(3, 3, t0 + Duration::from_millis(900)).is_ok());
        assert!(b.stragglers(t0 + Duration::from_millis(999), WAIT).is_empty());
        // 2 has waited a second behind 1; 3, settled later, still waits: one busy period behind a
        // slow delivery does not release everything settled since one by one.
        assert_eq!(b.stragglers(t0 + WAIT, WAIT), vec![2]);
        assert_eq!(b.stragglers(t0 + WAIT + Duration::from_millis(100), WAIT), Vec::<u64>::new());
        // 1 settles: 2 went alone and is not waited for; 3 goes in order.
        assert!(b.settle(1, 1, t0 + WAIT).is_ok());
        assert_eq!(b.release(), vec![1, 3]);
        assert!(b.stragglers(t0 + WAIT * 3, WAIT).is_empty(), "nothing released twice");
    }

    #[test]
    fn the_next_wake_up_is_when_the_oldest_waiter_becomes_a_straggler() {
        let t0 = Instant::now();
        let mut b = book(1..=3, &[2], t0);
        assert!(b.settle(3, 3, t0 + Duration::from_millis(300)).is_ok());
        assert_eq!(b.next_straggler(WAIT), Some(t0 + WAIT));
        assert_eq!(b.stragglers(t0 + WAIT, WAIT), vec![2]);
        assert_eq!(b.next_straggler(WAIT), Some(t0 + Duration::from_millis(300) + WAIT));
    }

    #[test]
    fn cleared_positions_are_void_and_a_forgotten_one_is_not_waited_for() {
        let t0 = Instant::now();
        let mut b = book(1..=3, &[2, 3], t0);
        assert_eq!(b.clear(), vec![2, 3]);
        assert_eq!(b.settle(1, 1, t0), Err(1), "its session is gone");
        assert!(b.stragglers(t0 + WAIT, WAIT).is_empty(), "the old positions are gone");
        let mut b = book(1..=2, &[2], t0);
        b.forget(1);
        assert_eq!(b.release(), vec![2]);
    }

    #[test]
    fn settling_twice_or_unread_is_refused() {
        let t0 = Instant::now();
        let mut b = book(1..=1, &[1], t0);
        assert_eq!(b.settle(1, 10, t0), Err(10));
        assert_eq!(b.settle(7, 7, t0), Err(7));
    }
}
