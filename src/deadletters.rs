//! `dead-letters list` and `dead-letters redrive`: what sits in a source's dead letters, grouped by
//! kind, and putting back what the current mappings now take (through the source's `DeadLetters`).

use crate::engine;
use crate::model::kind::Failure;
use crate::source::{DeadLetter, DeadLetters};
use crate::template::device::DeviceMapping;
use crate::template::fhir::FhirMapping;
use std::collections::BTreeMap;

/// One kind of dead letter: how many, and the first one's reason.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KindSummary {
    pub kind: String,
    pub count: usize,
    #[serde(rename = "firstError")]
    pub first_error: String,
}

fn summarize<'a>(letters: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<KindSummary> {
    let mut by_kind: BTreeMap<String, KindSummary> = BTreeMap::new();
    for (kind, error) in letters {
        by_kind
            .entry(kind.to_string())
            .or_insert_with(|| KindSummary { kind: kind.to_string(), count: 0, first_error: error.to_string() })
            .count += 1;
    }
    let mut out: Vec<KindSummary> = by_kind.into_values().collect();
    out.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.kind.cmp(&b.kind)));
    out
}

/// Every dead letter, taken (not removed); on an error, the reader is closed first.
async fn take_all(letters: &mut Box<dyn DeadLetters>) -> Result<Vec<DeadLetter>, String> {
    let mut all = Vec::new();
    while let Some(d) = letters.take().await? {
        all.push(d);
    }
    Ok(all)
}

/// The dead letters by kind, most frequent first. Nothing is removed.
pub async fn list(mut letters: Box<dyn DeadLetters>) -> Result<Vec<KindSummary>, String> {
    let all = take_all(&mut letters).await;
    letters.close().await;
    let all = all?;
    Ok(summarize(all.iter().map(|d| (d.kind.as_str(), d.error.as_str()))))
}

/// Why a dead letter would still fail with the current mappings (the service's own rule,
/// `engine::would_pass`); `None` when it now passes.
pub fn still_failing(d: &DeadLetter, device: &DeviceMapping, fhir: &FhirMapping) -> Option<Failure> {
    engine::would_pass(device, fhir, d.envelope.clone()).err()
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Redrive {
    /// Messages in the dead-letter queue.
    pub total: usize,
    /// Of those, of the kind asked for.
    pub selected: usize,
    /// Of those, how many the current mappings now take.
    pub pass: usize,
    /// Moved back to their queue (0 in a dry run).
    pub moved: usize,
    /// Those that would still fail, by the kind they would fail with now.
    #[serde(rename = "stillFailing")]
    pub still_failing: Vec<KindSummary>,
    /// Messages that would pass but could not be moved, and why (they stay dead-lettered).
    #[serde(rename = "notMoved")]
    pub not_moved: Vec<String>,
}

/// Re-normalizes each dead letter (of `kind`, if given) with the current mappings and moves those
/// that pass back to where they were read from, each confirmed by the broker before it leaves the
/// dead letters.
pub async fn redrive(
    mut letters: Box<dyn DeadLetters>,
    device: &DeviceMapping,
    fhir: &FhirMapping,
    kind: Option<&str>,
    dry_run: bool,
) -> Result<Redrive, String> {
    let all = match take_all(&mut letters).await {
        Ok(all) => all,
        Err(e) => {
            letters.close().await;
            return Err(e);
        }
    };
    let mut report = Redrive { total: all.len(), ..Default::default() };
    let mut failing = Vec::new();
    for d in all.into_iter().filter(|d| kind.is_none_or(|k| d.kind == k)) {
        report.selected += 1;
        if let Some(why) = still_failing(&d, device, fhir) {
            failing.push(why);
            continue;
        }
        report.pass += 1;
        if dry_run {
            continue;
        }
        match letters.move_back(d).await {
            Ok(()) => report.moved += 1,
            Err(e) => report.not_moved.push(e),
        }
    }
    letters.close().await;
    report.still_failing = summarize(failing.iter().map(|f: &Failure| (f.kind.as_str(), f.message.as_str())));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_by_kind_and_keeps_the_first_reason() {
        let s =
            summarize([("missing-value", "first"), ("fhir-rejected", "400"), ("missing-value", "second")].into_iter());
        assert_eq!(
            s,
            vec![
                KindSummary { kind: "missing-value".into(), count: 2, first_error: "first".into() },
                KindSummary { kind: "fhir-rejected".into(), count: 1, first_error: "400".into() },
            ]
        );
    }
}
