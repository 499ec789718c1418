//! Grouping: measurements of one device, type, patient, encounter and correlation id that fall in
//! the same window of the FHIR template become one Observation.

use super::measurement::Measurement;
use super::time::{self, TICK};
use crate::model::kind::ErrorKind;
use crate::template::fhir::{CodeValueTemplate, FhirMapping, PeriodInterval};
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupKey {
    pub device_id: String,
    pub type_name: Arc<str>,
    pub patient_id: Option<String>,
    pub encounter_id: Option<String>,
    pub correlation_id: Option<String>,
    pub window: Window,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    /// Single: the reading's time, to the millisecond.
    Instant(DateTime<Utc>),
    /// Hourly or Daily: the bucket's start.
    Bucket(PeriodInterval, DateTime<Utc>),
    /// CorrelationId: spans the readings of the correlation id.
    Correlation,
}

#[derive(Debug, Clone)]
pub struct Group {
    pub key: GroupKey,
    /// Readings by occurrence time; one per time (the latest ingested).
    pub readings: BTreeMap<DateTime<Utc>, Measurement>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GroupError {
    #[error("no FHIR template has typeName '{0}': add a CodeValueFhir template for it to the FHIR mapping")]
    NoTemplate(String),
    #[error(
        "FHIR template '{0}' groups by correlation id (periodInterval -1), but the measurement has none: add correlationIdExpression to the device template"
    )]
    MissingCorrelationId(String),
}

impl GroupError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            GroupError::NoTemplate(_) => ErrorKind::NoFhirTemplate,
            GroupError::MissingCorrelationId(_) => ErrorKind::MissingCorrelationId,
        }
    }
}

impl Group {
    pub fn new(key: GroupKey) -> Group {
        Group { key, readings: BTreeMap::new() }
    }

    /// The window's first and last instant (the Observation's effectivePeriod).
    pub fn boundary(&self) -> (DateTime<Utc>, DateTime<Utc>) {
        match self.key.window {
            Window::Instant(t) => (t, t),
            Window::Bucket(PeriodInterval::Daily, s) => (s, s + TimeDelta::days(1) - TICK),
            Window::Bucket(_, s) => (s, s + TimeDelta::hours(1) - TICK),
            Window::Correlation => {
                let first = self.readings.keys().next().copied().unwrap_or_default();
                let last = self.readings.keys().next_back().copied().unwrap_or(first);
                (first, last)
            }
        }
    }

    /// The part of the Observation identifier that names the window.
    pub fn id_segment(&self) -> String {
        let (start, end) = self.boundary();
        match self.key.window {
            Window::Instant(_) => format!("{}.{}", time::id_millis(start), time::id_millis(end)),
            Window::Bucket(..) => format!("{}.{}", time::id_seconds(start), time::id_seconds(end)),
            Window::Correlation => self.key.correlation_id.clone().unwrap_or_default(),
        }
    }

    /// The readings of one value, in time order.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (DateTime<Utc>, &'a str)> + 'a {
        self.readings.iter().filter_map(move |(t, m)| m.value(name).map(|v| (*t, v)))
    }

    pub fn has_value(&self, name: &str) -> bool {
        self.values(name).next().is_some()
    }

    /// Adds a reading; at a time already held, the latest ingested wins.
    pub fn insert(&mut self, m: Measurement) {
        let t = match self.key.window {
            Window::Instant(t) => t,
            _ => m.occurrence_time,
        };
        match self.readings.get(&t) {
            // Equal times: the latest ingested wins; without ingestion times, the later arrival.
            Some(old) if old.ingestion_time > m.ingestion_time => {}
            _ => {
                self.readings.insert(t, m);
            }
        }
    }
}

/// The window a measurement falls in under a template.
pub fn key_for(m: &Measurement, template: &CodeValueTemplate) -> Result<GroupKey, GroupError> {
    let t = m.occurrence_time;
    let window = match template.effective_interval() {
        PeriodInterval::Single => Window::Instant(t.duration_trunc(TimeDelta::milliseconds(1)).unwrap_or(t)),
        p @ PeriodInterval::Hourly => Window::Bucket(p, t.duration_trunc(TimeDelta::hours(1)).unwrap_or(t)),
        p @ PeriodInterval::Daily => Window::Bucket(p, t.duration_trunc(TimeDelta::days(1)).unwrap_or(t)),
        PeriodInterval::CorrelationId => {
            if m.correlation_id.is_none() {
                return Err(GroupError::MissingCorrelationId(template.type_name.clone()));
            }
            Window::Correlation
        }
    };
    Ok(GroupKey {
        device_id: m.device_id.clone(),
        type_name: m.type_name.clone(),
        patient_id: m.patient_id.clone(),
        encounter_id: m.encounter_id.clone(),
        correlation_id: m.correlation_id.clone(),
        window,
    })
}

/// Accumulates measurements into groups, keeping the order in which groups were first seen. Each
/// group carries a `T` of the caller's (the shards: the messages it came from; `transform`:
/// nothing). The one grouping rule of the service and the offline tools.
#[derive(Debug)]
pub struct Grouper<T = ()> {
    groups: Vec<(Group, T)>,
    index: HashMap<GroupKey, usize>,
}

impl<T> Default for Grouper<T> {
    fn default() -> Self {
        Grouper { groups: Vec::new(), index: HashMap::new() }
    }
}

impl<T> Grouper<T> {
    /// Adds `m` to the group of its window under its FHIR template; returns that group's `T`
    /// (made by `new` when the group is new).
    pub fn add_with(
        &mut self,
        mapping: &FhirMapping,
        m: Measurement,
        new: impl FnOnce() -> T,
    ) -> Result<&mut T, GroupError> {
        let template = mapping.template(&m.type_name).ok_or_else(|| GroupError::NoTemplate(m.type_name.to_string()))?;
        let key = key_for(&m, template)?;
        let i = match self.index.get(&key) {
            Some(&i) => i,
            None => {
                self.index.insert(key.clone(), self.groups.len());
                self.groups.push((Group::new(key), new()));
                self.groups.len() - 1
            }
        };
        let (group, carried) = &mut self.groups[i];
        group.insert(m);
        Ok(carried)
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The groups so far, in the order first seen; the grouper starts empty again.
    pub fn take(&mut self) -> Vec<(Group, T)> {
        self.index.clear();
        std::mem::take(&mut self.groups)
    }
}

impl Grouper<()> {
    pub fn add(&mut self, mapping: &FhirMapping, m: Measurement) -> Result<(), GroupError> {
        self.add_with(mapping, m, || ()).map(|_| ())
    }

    pub fn into_groups(mut self) -> Vec<Group> {
        self.take().into_iter().map(|(g, ())| g).collect()
    }
}
