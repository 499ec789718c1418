//! What the pipeline's unit tests share: the sample mappings, a writer and an identity cache on a
//! store of the test's choice (the in-memory FHIR server, the dry run), and messages whose guards
//! report back to the test as they would to a source.

use super::Counted;
use super::identity::IdentityCache;
use super::mappings::Mappings;
use super::writer::{FhirWriter, PendingGroup, WriteBatch};
use crate::config::IdentityMode;
use crate::fhir::FhirStore;
use crate::model::group::{Group, key_for};
use crate::source::{DeliveryGuard, Position, Settled, Status};
use crate::status::ActorStats;
use crate::template::device::{DeviceMapping, envelope};
use crate::template::fhir::FhirMapping;
use actix::prelude::*;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

pub fn sample_mappings() -> Arc<Mappings> {
    let read = |f: &str| {
        let path = format!("{}/mappings/{f}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    let (device_text, fhir_text) = (read("devicecontent.json"), read("fhirmapping.json"));
    let device = DeviceMapping::parse(&device_text).unwrap_or_else(|e| panic!("{e}"));
    let fhir = FhirMapping::parse(&fhir_text).unwrap_or_else(|e| panic!("{e}"));
    Arc::new(Mappings { device, fhir, version: "test".into(), device_text, fhir_text })
}

pub fn stats(name: &str) -> Arc<ActorStats> {
    ActorStats::new(name.into(), "test")
}

pub fn identity_cache(store: Arc<dyn FhirStore>, mode: IdentityMode) -> Counted<IdentityCache> {
    let s = stats("identity");
    let ttl = Duration::from_secs(60);
    let addr = IdentityCache::new(store, mode, Some("urn:test:device".into()), ttl, ttl, s.clone()).start();
    Counted { addr, stats: s }
}

/// A writer (batch writes on) and its identity cache, on `store`, and the channel where the
/// messages' guards report.
pub struct Kit {
    pub writer: Counted<FhirWriter>,
    pub mappings: Arc<Mappings>,
    to_test: UnboundedSender<Settled>,
    settled: UnboundedReceiver<Settled>,
    next: usize,
}

impl Kit {
    pub fn new(store: Arc<dyn FhirStore>) -> Kit {
        Kit::with(store, true)
    }

    pub fn with(store: Arc<dyn FhirStore>, batch: bool) -> Kit {
        let identity = identity_cache(store.clone(), IdentityMode::Create);
        let s = stats("writer");
        let addr = FhirWriter::new(store, identity, batch, s.clone(), None).start();
        let (to_test, settled) = unbounded_channel();
        Kit { writer: Counted { addr, stats: s }, mappings: sample_mappings(), to_test, settled, next: 0 }
    }

    /// Normalizes and groups `bodies` (one message each, in order) and hands the groups to the
    /// writer as one batch; returns the messages' numbers.
    pub fn write(&mut self, bodies: &[Value]) -> Vec<usize> {
        let mut groups: Vec<PendingGroup> = Vec::new();
        let mut numbers = Vec::new();
        for body in bodies {
            let n = self.next;
            self.next += 1;
            numbers.push(n);
            let guard = Arc::new(DeliveryGuard::new(Position::new(n), None, self.to_test.clone()));
            let measurements =
                self.mappings.device.normalize(&envelope(body.clone())).unwrap_or_else(|e| panic!("{e}"));
            assert!(!measurements.is_empty(), "{body} matches a template");
            for m in measurements {
                let template = self.mappings.fhir.template(&m.type_name).unwrap_or_else(|| panic!("{}", m.type_name));
                let key = key_for(&m, template).unwrap_or_else(|e| panic!("{e}"));
                let i = match groups.iter().position(|g| g.group.key == key) {
                    Some(i) => i,
                    None => {
                        let mappings = self.mappings.clone();
                        groups.push(PendingGroup::new(Group::new(key), Vec::new(), mappings));
                        groups.len() - 1
                    }
                };
                groups[i].group.insert(m);
                if !groups[i].guards.iter().any(|g| Arc::ptr_eq(g, &guard)) {
                    groups[i].guards.push(guard.clone());
                }
            }
        }
        self.writer.do_send(WriteBatch { groups });
        numbers
    }

    /// The status of every message in `numbers`, waiting up to 10 s for them.
    pub async fn settled(&mut self, numbers: &[usize]) -> HashMap<usize, Status> {
        let mut got = HashMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while numbers.iter().any(|n| !got.contains_key(n)) {
            let s = tokio::time::timeout_at(deadline, self.settled.recv())
                .await
                .unwrap_or_else(|_| panic!("not settled within 10 s: {numbers:?}, got {got:?}"))
                .unwrap_or_else(|| panic!("the guards' channel closed"));
            let n = s.position.into_inner::<usize>().unwrap_or_else(|| panic!("a position of another kind"));
            got.insert(n, s.status);
        }
        got
    }

    /// Nothing settled for `d`: the messages are held.
    pub async fn nothing_settled_for(&mut self, d: Duration) {
        if let Ok(Some(s)) = tokio::time::timeout(d, self.settled.recv()).await {
            let n = s.position.into_inner::<usize>();
            panic!("message {n:?} settled ({:?}) while it should be held", s.status);
        }
    }
}

/// A heart-rate reading of `device` (patient `p-{device}`) at second `s` after 08:30 on a fixed day.
pub fn heart_rate(device: &str, s: u32, bpm: u32) -> Value {
    serde_json::json!({
        "deviceId": device,
        "patientId": format!("p-{device}"),
        "measurementTime": format!("2026-03-15T08:30:{s:02}.000Z"),
        "heartRate": bpm,
    })
}

/// A blood pressure reading (an instant window) of `device` at second `s`.
pub fn blood_pressure(device: &str, s: u32, systolic: u32) -> Value {
    serde_json::json!({
        "deviceId": device,
        "patientId": format!("p-{device}"),
        "measurementTime": format!("2026-03-15T08:31:{s:02}.000Z"),
        "systolic": systolic,
        "diastolic": 80,
    })
}
