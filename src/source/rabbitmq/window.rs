//! The consumer's prefetch window, sized to the byte budget: opened again with a new `basic.qos`
//! when the message sizes call for it, and cancelled while the budget is spent.
//!
//! Not on single-active-consumer queues (the sharded topology): cancelling the active consumer
//! hands the queue to another instance's waiting one. There the window stays `broker.prefetch`,
//! and a spent budget stops taking deliveries from the client's buffer instead, which bounds what
//! the pipeline holds but not the bodies the broker already sent (at most the prefetch of them).

use super::{Consumer, Tagged, generation_tag, subscribe};
use crate::metrics;
use crate::source::budget::Budget;
use crate::status::QueueState;
use futures_util::stream::{BoxStream, SelectAll};
use lapin::Channel;
use lapin::options::{BasicCancelOptions, BasicQosOptions};
use std::sync::Arc;

/// The window a session opens with: what the budget holds of the largest messages allowed until
/// the sizes seen say more fit (a window counts messages, and the broker fills it at once).
pub(super) fn first_window(consumer: &Consumer) -> u16 {
    let budget = consumer.intake.budget();
    if fixed(consumer) {
        return consumer.broker.prefetch;
    }
    if budget.seen_any() { budget.window(consumer.broker.prefetch) } else { budget.cautious(consumer.broker.prefetch) }
}

/// This session's consumers and the window they were opened with. The window follows the sizes of
/// the messages (`Budget::window`): the consumers are opened again, with the new `basic.qos`, when
/// it should halve or double, and cancelled while the byte budget is spent (a paused source).
/// Whether the window stays as opened (single-active-consumer queues).
pub(super) fn fixed(consumer: &Consumer) -> bool {
    consumer.broker.topology == crate::source::rabbitmq::settings::Topology::Sharded
}

pub(super) struct Window {
    /// Never cancelled or opened again (`fixed`).
    pub(super) fixed: bool,
    pub(super) queues: Vec<Arc<QueueState>>,
    pub(super) prefetch: u16,
    pub(super) paused: bool,
    /// The window to open once the cancelled consumers' streams have ended (a resize).
    pub(super) reopen: Option<u16>,
    /// Which consumers are open (`generation_tag`).
    pub(super) generation: u32,
    /// Consumers cancelled here whose streams have not ended yet: their end is no loss, and no
    /// consumer opens before it (what the old one was sent is handed over first, in order).
    pub(super) cancelled: std::collections::HashMap<Arc<str>, usize>,
}

impl Window {
    pub(super) async fn cancel(&mut self, channel: &Channel) -> Result<(), String> {
        for q in &self.queues {
            channel
                .basic_cancel(generation_tag(&q.name, self.generation).as_str().into(), BasicCancelOptions::default())
                .await
                .map_err(|e| e.to_string())?;
            *self.cancelled.entry(q.name.clone()).or_default() += 1;
        }
        Ok(())
    }

    pub(super) async fn open(
        &mut self,
        channel: &Channel,
        prefetch: u16,
        deliveries: &mut SelectAll<BoxStream<'static, Tagged>>,
    ) -> Result<(), String> {
        channel.basic_qos(prefetch, BasicQosOptions::default()).await.map_err(|e| e.to_string())?;
        self.generation += 1;
        for q in &self.queues {
            deliveries.push(subscribe(channel, q, self.generation).await.map_err(|e| e.to_string())?);
        }
        self.prefetch = prefetch;
        self.paused = false;
        Ok(())
    }

    /// After a delivery: pause when the budget is spent, else resize when the sizes call for it.
    pub(super) async fn adjust(&mut self, channel: &Channel, budget: &Budget, configured: u16) -> Result<(), String> {
        if self.paused || self.reopen.is_some() {
            return Ok(());
        }
        if budget.spent() {
            metrics::get().source_pauses.inc();
            tracing::info!(
                in_flight_bytes = budget.used(),
                "pipeline.max_in_flight_bytes is spent: taking no more messages until some are settled"
            );
            if !self.fixed {
                self.cancel(channel).await?;
            }
            self.paused = true;
            return Ok(());
        }
        if self.fixed {
            return Ok(());
        }
        let want = budget.window(configured);
        if want < self.prefetch / 2 || want >= self.prefetch.saturating_mul(2) {
            tracing::debug!(from = self.prefetch, to = want, "resizing the prefetch window to the message sizes");
            self.cancel(channel).await?;
            self.reopen = Some(want);
        }
        Ok(())
    }

    /// The end of a consumer's stream that this window cancelled.
    pub(super) fn expected_end(&mut self, queue: &str) -> bool {
        match self.cancelled.get_mut(queue) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    /// Its consumers are open (cancelling them is what a stop does).
    pub(super) fn consuming(&self) -> bool {
        self.reopen.is_none() && (!self.paused || self.fixed)
    }

    /// Deliveries are taken from the client: not while a fixed window is paused.
    pub(super) fn taking(&self) -> bool {
        !(self.paused && self.fixed)
    }

    /// The budget has room again: take deliveries again, with the window that fits now.
    pub(super) async fn resume(
        &mut self,
        channel: &Channel,
        budget: &Budget,
        configured: u16,
        deliveries: &mut SelectAll<BoxStream<'static, Tagged>>,
    ) -> Result<(), String> {
        tracing::info!(in_flight_bytes = budget.used(), "taking messages again");
        if self.fixed {
            self.paused = false;
            return Ok(());
        }
        self.open(channel, budget.window(configured), deliveries).await
    }

    /// Every cancelled consumer's stream has ended.
    pub(super) fn quiet(&self) -> bool {
        self.cancelled.values().all(|n| *n == 0)
    }

    /// A resize waiting for the old consumers' streams to end: now, if they have.
    pub(super) async fn resume_resize(
        &mut self,
        channel: &Channel,
        deliveries: &mut SelectAll<BoxStream<'static, Tagged>>,
    ) -> Result<(), String> {
        if self.quiet()
            && let Some(want) = self.reopen.take()
        {
            self.open(channel, want, deliveries).await?;
        }
        Ok(())
    }
}
