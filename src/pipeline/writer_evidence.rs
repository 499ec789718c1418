//! What a write's answer proves. A 2xx write counts only with evidence of a version; an answer
//! without one is read back, and held when the server does not hold the write. A create answered
//! 200 looks at the history for a version it overwrote.

use super::{Held, Item, PendingGroup, Stored, Work, Write, count_written, template, written};
use crate::fhir::{Before, FhirError};
use crate::metrics;
use crate::model::kind::ErrorKind;
use crate::model::observation::{self, Observation, Outcome};

impl Work {
    /// Writes the server answered 2xx without a version (no etag, no `_history` location, no
    /// echoed resource): read back, and done only where the server holds every group. Where it
    /// does not (an HTML page from a proxy, a body dropped on the way), the groups are held like a
    /// 503's and written again: never counted as written, never dead-lettered for it. A create
    /// answered 200 (`true` beside it) then looks at the history with the version read back; the
    /// writes that must merge an overwritten version again are returned.
    pub(super) async fn confirm(&self, stored: &mut Stored, writes: Vec<(Write, bool)>, held: &mut Held) -> Vec<Write> {
        let mut conflicts = Vec::new();
        if writes.is_empty() {
            return conflicts;
        }
        let ids: Vec<String> = writes.iter().map(|(w, _)| w.id.clone()).collect();
        let reads = self.read_all(&ids).await;
        let m = metrics::get();
        for ((w, created_as_update), r) in writes.into_iter().zip(reads) {
            let read = match r {
                Ok(Some(read)) => read,
                Ok(None) => {
                    m.unconfirmed_writes.with_label_values(&["missing"]).inc();
                    self.hold_unwritten(w, held);
                    continue;
                }
                Err(e) => {
                    w.items.into_iter().for_each(|i| held.settle(i.pending, &e));
                    continue;
                }
            };
            let obs = match serde_json::from_value::<Observation>(read.resource) {
                Ok(obs) => obs,
                // Retrying cannot change what the server holds: as when it is read before a merge.
                Err(e) => {
                    let text = format!(
                        "Observation/{} on the server is not an Observation this connector can merge into: {e}",
                        w.id
                    );
                    w.fail(ErrorKind::FhirInvalidResponse, &text);
                    continue;
                }
            };
            if !holds(&w, &obs) {
                m.unconfirmed_writes.with_label_values(&["missing"]).inc();
                self.hold_unwritten(w, held);
                continue;
            }
            m.unconfirmed_writes.with_label_values(&["confirmed"]).inc();
            match read.version {
                Some(v) if created_as_update => {
                    self.created_as_update(stored, Write { obs, ..w }, v, held, &mut conflicts).await
                }
                Some(v) => written(stored, Write { obs, ..w }, Some(v)),
                // Without a version the next write cannot be conditional (read it again then), and
                // no history can be asked about: a server that keeps no versions is taken at its word.
                None => {
                    count_written(&w);
                    stored.map.remove(&w.id);
                }
            }
        }
        conflicts
    }

    /// The server answered the write but does not hold it: held and written again, and readiness
    /// says why.
    fn hold_unwritten(&self, w: Write, held: &mut Held) {
        let e = FhirError::Invalid {
            method: "PUT",
            path: format!("Observation/{}", w.id),
            message: "a 2xx answer to a write with no version (no etag, no _history location, no echoed resource), and reading the Observation back does not show the write".into(),
        };
        self.store.circuit().trip(e.summary());
        w.items.into_iter().for_each(|i| held.settle(i.pending, &e));
    }

    /// A create that the server answered as an update (200, at version `v`): another writer may
    /// have created this window between our read and our write, and we replaced its version. That
    /// version is merged back in before anything is acked.
    pub(super) async fn created_as_update(
        &self,
        stored: &mut Stored,
        mut w: Write,
        v: String,
        held: &mut Held,
        conflicts: &mut Vec<Write>,
    ) {
        match self.recover_overwritten(stored, &mut w, &v).await {
            Ok(true) => conflicts.push(w),
            // Nothing was there before: a plain create, answered 200 (some servers do).
            Ok(false) => written(stored, w, Some(v)),
            Err(e) if e.retryable() => w.items.into_iter().for_each(|i| held.settle(i.pending, &e)),
            Err(e) => w.fail(ErrorKind::FhirConflict, &e.to_string()),
        }
    }

    /// After a create answered 200: what the history shows before our version. Another writer's
    /// fresh version that we overwrote joins this write as one more group, so every conflict round
    /// merges it again until the union is written (`Ok(true)`); a history that starts with our
    /// version means nothing was overwritten (`Ok(false)`). If the history does not show our
    /// version, the write fails (and is dead-lettered) rather than claim a success it cannot vouch for.
    pub(super) async fn recover_overwritten(
        &self,
        stored: &mut Stored,
        w: &mut Write,
        ours: &str,
    ) -> Result<bool, FhirError> {
        let lost = || FhirError::Decode {
            method: "GET",
            path: "Observation/_history".into(),
            message: format!(
                "Observation/{} was created by another writer at the same time, and its history does not show the version this write replaced",
                w.id
            ),
        };
        let previous = match self.store.history_before("Observation", &w.id, ours).await? {
            Before::Nothing => return Ok(false),
            Before::NotShown => return Err(lost()),
            Before::Version(previous) => previous,
        };
        metrics::get().create_races.inc();
        stored.map.remove(&w.id);
        let obs = serde_json::from_value::<Observation>(previous.resource).map_err(|_| lost())?;
        let first = w.items.first().ok_or_else(lost)?;
        let template = template(&first.pending).ok_or_else(lost)?;
        let group = observation::as_group(&obs, template, first.pending.group.key.clone());
        let identity = first.identity.clone();
        let mappings = first.pending.mappings.clone();
        w.items.push(Item::new(PendingGroup::new(group, Vec::new(), mappings), identity));
        Ok(true)
    }
}

/// Whether `obs` (read back from the server) already holds every group of the write.
fn holds(w: &Write, obs: &Observation) -> bool {
    let now = chrono::Utc::now();
    w.items.iter().all(|i| {
        template(&i.pending).is_some_and(|t| {
            matches!(
                observation::build_or_merge(t, &i.pending.group, &i.identity, Some(obs), now),
                Ok(Outcome::Unchanged)
            )
        })
    })
}
