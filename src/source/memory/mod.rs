//! An in-memory source, for tests (quickwit's in-memory queue): the test pushes message bodies,
//! the source hands them to the intake like any broker delivery, and records what became of each
//! (persisted, or dead-lettered with its failure) where the test reads it. Not a `source.kind`.

use crate::source::{DeliveryGuard, Intake, Position, Settled, Source, Status, body_json, envelope};
use crate::status::Shared;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::{Notify, watch};

/// What the test holds: where to push messages and read their fate.
#[derive(Clone)]
pub struct Feed {
    to_source: UnboundedSender<Vec<u8>>,
    book: Arc<Book>,
}

#[derive(Default)]
struct Book {
    /// By message number (the order pushed, from 0).
    settled: Mutex<Vec<(usize, Status)>>,
    changed: Notify,
}

/// The source itself, until started.
pub struct Memory {
    messages: UnboundedReceiver<Vec<u8>>,
    book: Arc<Book>,
}

/// A source and the feed that drives it.
pub fn memory() -> (Memory, Feed) {
    let (to_source, messages) = unbounded_channel();
    let book = Arc::new(Book::default());
    (Memory { messages, book: book.clone() }, Feed { to_source, book })
}

impl Feed {
    pub fn push(&self, body: &[u8]) {
        let _ = self.to_source.send(body.to_vec());
    }

    /// Every message's fate so far, in the order they settled.
    pub fn settled(&self) -> Vec<(usize, Status)> {
        self.book.settled.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits until `n` messages have settled.
    pub async fn until_settled(&self, n: usize) {
        loop {
            let changed = self.book.changed.notified();
            if self.settled().len() >= n {
                return;
            }
            changed.await;
        }
    }
}

#[async_trait::async_trait(?Send)]
impl Source for Memory {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn reads(&self) -> String {
        "the test's messages".into()
    }

    fn in_flight_bound(&self) -> usize {
        1000
    }

    fn start(self: Box<Self>, intake: Arc<dyn Intake>, shared: Arc<Shared>) -> Box<dyn crate::source::Running> {
        shared.broker_connected.store(true, Ordering::SeqCst);
        let _ = shared.source.set(Arc::new(View));
        let (to_settler, settled) = unbounded_channel();
        let (stop, stopped) = watch::channel(false);
        let reader = actix_rt::spawn(read(self.messages, intake, to_settler, stopped));
        let settler = actix_rt::spawn(settle(settled, self.book));
        Box::new(Running { stop, reader: Some(reader), settler })
    }

    async fn publisher(&self, _: usize) -> Result<Box<dyn crate::source::Publish>, String> {
        Err("the in-memory source takes messages through its Feed".into())
    }

    async fn dead_letters(&self) -> Result<Box<dyn crate::source::DeadLetters>, String> {
        Err("the in-memory source keeps its dead letters in its Feed".into())
    }
}

/// A message taken: its number, and its bytes counted in flight until it is settled.
struct Taken {
    n: usize,
    _lease: crate::source::budget::Lease,
}

async fn read(
    mut messages: UnboundedReceiver<Vec<u8>>,
    intake: Arc<dyn Intake>,
    to_settler: UnboundedSender<Settled>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut n = 0usize;
    loop {
        let body = tokio::select! {
            b = messages.recv() => b,
            _ = stopped.changed() => None,
        };
        let Some(body) = body else { return };
        crate::source::book_received();
        let budget = intake.budget();
        let (lease, too_large) = budget.take(body.len());
        let guard = DeliveryGuard::new(Position::new(Taken { n, _lease: lease }), None, to_settler.clone());
        match too_large {
            Some(why) => guard.fail(crate::model::kind::ErrorKind::MessageTooLarge, why),
            None => {
                let event = body_json(&body, "message").map(|b| envelope(b, Default::default(), Default::default()));
                intake.accept(event, Arc::new(guard));
            }
        }
        n += 1;
        if budget.spent() {
            tokio::select! {
                _ = budget.room() => {}
                _ = stopped.changed() => return,
            }
        }
    }
}

async fn settle(mut settled: UnboundedReceiver<Settled>, book: Arc<Book>) {
    while let Some(s) = settled.recv().await {
        crate::source::book_settled(s.sent_at, s.received, true);
        let n = s.position.into_inner::<Taken>().map_or(usize::MAX, |t| t.n);
        if let Ok(mut v) = book.settled.lock() {
            v.push((n, s.status));
        }
        book.changed.notify_waiters();
    }
}

struct View;

impl crate::status::SourceView for View {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({"kind": "memory"})
    }
}

struct Running {
    stop: watch::Sender<bool>,
    reader: Option<tokio::task::JoinHandle<()>>,
    settler: tokio::task::JoinHandle<()>,
}

#[async_trait::async_trait(?Send)]
impl crate::source::Running for Running {
    async fn stop_taking(&mut self) {
        let _ = self.stop.send(true);
        if let Some(r) = self.reader.take() {
            let _ = r.await;
        }
    }

    async fn close(self: Box<Self>) {
        self.settler.abort();
    }
}
