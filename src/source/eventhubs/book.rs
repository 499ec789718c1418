//! One partition's events between reading and checkpointing. The pipeline settles them in any
//! order (shards and writers finish when they finish); the checkpoint may only move to the end of
//! the run of settled events from the oldest, the same rule RabbitMQ's in-order acks follow: a
//! restart then re-reads from the oldest event not yet persisted or dead-lettered, never past it.
//! The order itself is `source::ordered::InOrder`, shared with RabbitMQ's acks.

use super::store::Checkpoint;
use crate::source::ordered::InOrder;
use std::collections::HashMap;
use std::time::Instant;

#[derive(Default)]
pub struct Book {
    /// Read and not yet behind the checkpoint, by sequence number.
    order: InOrder<i64, Checkpoint>,
    /// Where each open event is, until it settles.
    at: HashMap<i64, Checkpoint>,
    /// The checkpoint to write next (moved since the last write), if any.
    unwritten: Option<Checkpoint>,
}

impl Book {
    pub fn read(&mut self, at: Checkpoint) {
        self.order.read(at.sequence_number);
        self.at.insert(at.sequence_number, at);
    }

    /// An event is persisted or dead-lettered; moves the checkpoint as far as the order allows.
    pub fn settled(&mut self, sequence_number: i64) {
        if let Some(at) = self.at.remove(&sequence_number) {
            let _ = self.order.settle(sequence_number, at, Instant::now());
        }
        if let Some(last) = self.order.release().pop() {
            self.unwritten = Some(last);
        }
    }

    /// Events read and not yet behind the checkpoint.
    pub fn in_flight(&self) -> usize {
        self.order.in_flight()
    }

    /// The checkpoint to write, once: `None` when it has not moved since.
    pub fn take_unwritten(&mut self) -> Option<Checkpoint> {
        self.unwritten.take()
    }

    /// A write that failed is tried again with the next round (unless a later one replaced it).
    pub fn unwrite(&mut self, c: Checkpoint) {
        if self.unwritten.is_none() {
            self.unwritten = Some(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seq: i64) -> Checkpoint {
        Checkpoint { offset: format!("o{seq}"), sequence_number: seq, enqueued_time: None }
    }

    #[test]
    fn the_checkpoint_waits_for_the_oldest_event_and_then_jumps_over_every_settled_one() {
        let mut b = Book::default();
        (10..15).for_each(|s| b.read(at(s)));
        b.settled(12);
        b.settled(11);
        assert_eq!(b.take_unwritten(), None, "10 is still being processed");
        assert_eq!(b.in_flight(), 5);
        b.settled(10);
        assert_eq!(b.take_unwritten(), Some(at(12)));
        assert_eq!(b.take_unwritten(), None, "written once");
        assert_eq!(b.in_flight(), 2);
        b.settled(14);
        b.settled(13);
        assert_eq!(b.take_unwritten(), Some(at(14)));
        assert_eq!(b.in_flight(), 0);
    }

    #[test]
    fn a_failed_write_is_retried_unless_a_later_checkpoint_replaced_it() {
        let mut b = Book::default();
        (0..3).for_each(|s| b.read(at(s)));
        b.settled(0);
        let c = b.take_unwritten().unwrap_or_else(|| panic!("moved"));
        b.unwrite(c);
        assert_eq!(b.take_unwritten(), Some(at(0)));
        b.settled(1);
        let c = b.take_unwritten().unwrap_or_else(|| panic!("moved"));
        b.settled(2);
        b.unwrite(c);
        assert_eq!(b.take_unwritten(), Some(at(2)), "the later one stands");
    }
}
