//! Observations: built from a group with its FHIR template, and merged into the Observation already
//! stored for the same window.

use super::group::{Group, GroupKey};
use super::ids::{self, SERVICE_SYSTEM};
use super::measurement::{Measurement, Property};
use super::sampled;
use super::time;
use crate::model::kind::ErrorKind;
use crate::template::fhir::{Code, CodeValueTemplate, ValueKind, ValueTemplate};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Observation {
    pub resource_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identifier: Vec<Identifier>,
    pub status: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub category: Vec<CodeableConcept>,
    pub code: CodeableConcept,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Reference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encounter: Option<Reference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_period: Option<Period>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued: Option<String>,
    #[serde(flatten)]
    pub value: ObservationValue,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<Reference>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub component: Vec<ObservationComponent>,
    /// Members this connector does not manage (notes, performer, ...), kept as they are on merge.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Observation {
    /// The resource as it is sent: `meta.versionId`, `meta.lastUpdated` and `meta.source` belong to
    /// the server (some servers refuse them in a write); the rest of `meta` (profiles, tags) stays.
    pub fn for_write(&self) -> Observation {
        let mut o = self.clone();
        if let Some(Value::Object(m)) = &mut o.meta {
            for k in ["versionId", "lastUpdated", "source"] {
                m.remove(k);
            }
            if m.is_empty() {
                o.meta = None;
            }
        }
        o
    }
}

/// Observation.value[x] and component.value[x]: at most one is set.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObservationValue {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_quantity: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_string: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_codeable_concept: Option<CodeableConcept>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_sampled_data: Option<SampledData>,
}

impl ObservationValue {
    pub fn is_empty(&self) -> bool {
        *self == ObservationValue::default()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObservationComponent {
    pub code: CodeableConcept,
    #[serde(flatten)]
    pub value: ObservationValue,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Identifier {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CodeableConcept {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub coding: Vec<Coding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Coding {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Reference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Period {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Quantity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Number>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SampledData {
    pub origin: Quantity,
    pub period: Number,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<Number>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lower_limit: Option<Number>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper_limit: Option<Number>,
    pub dimensions: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

/// The Patient, Device and (optionally) Encounter resource ids an Observation refers to.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub patient_id: String,
    pub device_id: String,
    pub encounter_id: Option<String>,
}

impl Identity {
    /// Create mode's ids: Patient and Device ids derived from the message's ids, as the reference's
    /// Create identity service derives them (`sha256("{system}_{value}")`). The one rule the
    /// service, its dry run and the offline `transform` share.
    pub fn created(device_system: Option<&str>, device_id: &str, patient_id: &str) -> Identity {
        Identity {
            patient_id: ids::resource_id(None, patient_id),
            device_id: ids::resource_id(device_system, device_id),
            encounter_id: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ObservationError {
    #[error(
        "FHIR template '{type_name}': value '{value_name}' is '{value}', which is not a number ({value_type} needs one)"
    )]
    NotANumber { type_name: String, value_name: String, value: String, value_type: &'static str },
    #[error(
        "FHIR template '{type_name}': value '{value_name}' would need {slots} SampledData slots (at most {max}); raise defaultPeriod or use a shorter periodInterval",
        max = sampled::MAX_SLOTS
    )]
    TooManySamples { type_name: String, value_name: String, slots: u64 },
}

impl ObservationError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ObservationError::NotANumber { .. } => ErrorKind::InvalidValue,
            ObservationError::TooManySamples { .. } => ErrorKind::WindowTooLarge,
        }
    }
}

/// What writing a group does to the stored Observation.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Create(Observation),
    Update(Observation),
    Unchanged,
}

/// The identifier (system and value) and id of a group's Observation.
pub fn identifier(group: &Group, identity: &Identity) -> (String, String) {
    let value = ids::observation_identifier(
        &identity.patient_id,
        &identity.device_id,
        &group.key.type_name,
        &group.id_segment(),
    );
    let id = ids::resource_id(Some(SERVICE_SYSTEM), &value);
    (value, id)
}

/// A new Observation for a group.
pub fn build(
    template: &CodeValueTemplate,
    group: &Group,
    identity: &Identity,
    issued: DateTime<Utc>,
) -> Result<Observation, ObservationError> {
    let (value, id) = identifier(group, identity);
    let (start, end) = group.boundary();
    let mut obs = Observation {
        resource_type: "Observation".into(),
        id: Some(id),
        meta: None,
        identifier: vec![Identifier { system: Some(SERVICE_SYSTEM.into()), value: Some(value), extra: Map::new() }],
        status: "final".into(),
        category: categories(template),
        code: concept(&template.codes, &group.key.type_name),
        subject: Some(reference("Patient", &identity.patient_id)),
        encounter: identity.encounter_id.as_deref().map(|e| reference("Encounter", e)),
        effective_period: Some(Period { start: Some(time::fhir(start)), end: Some(time::fhir(end)) }),
        issued: Some(issued.to_rfc3339_opts(SecondsFormat::Millis, true)),
        value: ObservationValue::default(),
        device: Some(reference("Device", &identity.device_id)),
        component: Vec::new(),
        extra: Map::new(),
    };
    if let Some(v) = template.value.as_ref().filter(|v| group.has_value(&v.value_name)) {
        obs.value = value_of(template, v, group, start, end, None)?;
    }
    for c in &template.components {
        if group.has_value(&c.value.value_name) {
            obs.component.push(ObservationComponent {
                code: concept(&c.codes, &c.value.value_name),
                value: value_of(template, &c.value, group, start, end, None)?,
                extra: Map::new(),
            });
        }
    }
    Ok(obs)
}

/// Creates the group's Observation, or merges the group into the one stored for its window:
/// new readings win their SampledData slots, single values are replaced, codes and category
/// follow the template; `status` becomes `amended` when anything changed.
pub fn build_or_merge(
    template: &CodeValueTemplate,
    group: &Group,
    identity: &Identity,
    existing: Option<&Observation>,
    issued: DateTime<Utc>,
) -> Result<Outcome, ObservationError> {
    let Some(existing) = existing else {
        return build(template, group, identity, issued).map(Outcome::Create);
    };
    let (gstart, gend) = group.boundary();
    let old_period = existing.effective_period.as_ref();
    let old_start = old_period.and_then(|p| p.start.as_deref()).and_then(time::parse);
    let old_end = old_period.and_then(|p| p.end.as_deref()).and_then(time::parse);
    let start = old_start.map_or(gstart, |s| s.min(gstart));
    let end = old_end.map_or(gend, |e| e.max(gend));

    let mut merged = existing.clone();
    merged.category = categories(template);
    merged.code = concept(&template.codes, &group.key.type_name);
    merged.effective_period = Some(Period { start: Some(time::fhir(start)), end: Some(time::fhir(end)) });
    if let Some(v) = template.value.as_ref().filter(|v| group.has_value(&v.value_name)) {
        merged.value = value_of(template, v, group, start, end, Some((&existing.value, old_start)))?;
    }
    for c in &template.components {
        if !group.has_value(&c.value.value_name) {
            continue;
        }
        let code = concept(&c.codes, &c.value.value_name);
        match merged.component.iter_mut().find(|oc| is_component_for(oc, &c.value.value_name)) {
            Some(oc) => {
                oc.value = value_of(template, &c.value, group, start, end, Some((&oc.value, old_start)))?;
                oc.code = code;
            }
            None => merged.component.push(ObservationComponent {
                code,
                value: value_of(template, &c.value, group, start, end, None)?,
                extra: Map::new(),
            }),
        }
    }
    if merged == *existing {
        return Ok(Outcome::Unchanged);
    }
    merged.status = "amended".into();
    Ok(Outcome::Update(merged))
}

/// The readings an Observation holds, as a group with `key`: SampledData decoded to its slot
/// times, single values at the period start. Lets an Observation another writer wrote be merged
/// like any group.
pub fn as_group(obs: &Observation, template: &CodeValueTemplate, key: GroupKey) -> Group {
    let start = obs.effective_period.as_ref().and_then(|p| p.start.as_deref()).and_then(time::parse);
    let mut by_time: std::collections::BTreeMap<DateTime<Utc>, Vec<Property>> = Default::default();
    if let Some(start) = start {
        for v in template.value_templates() {
            let stored = if template.value.as_ref() == Some(v) {
                Some(&obs.value)
            } else {
                obs.component.iter().find(|c| is_component_for(c, &v.value_name)).map(|c| &c.value)
            };
            let Some(stored) = stored else { continue };
            let readings: Vec<(DateTime<Utc>, String)> = match (&v.kind, stored) {
                (ValueKind::SampledData { .. }, ObservationValue { value_sampled_data: Some(sd), .. }) => {
                    sampled::decode(sd.data.as_deref().unwrap_or(""), start, sd.period.as_f64().unwrap_or(0.0))
                }
                (
                    ValueKind::Quantity { .. },
                    ObservationValue { value_quantity: Some(Quantity { value: Some(n), .. }), .. },
                ) => {
                    vec![(start, n.to_string())]
                }
                (ValueKind::String, ObservationValue { value_string: Some(s), .. }) => vec![(start, s.clone())],
                (ValueKind::CodeableConcept { .. }, ObservationValue { value_codeable_concept: Some(_), .. }) => {
                    vec![(start, "true".into())]
                }
                _ => Vec::new(),
            };
            let name: std::sync::Arc<str> = v.value_name.as_str().into();
            for (t, value) in readings {
                by_time.entry(t).or_default().push(Property { name: name.clone(), value });
            }
        }
    }
    let mut group = Group::new(key);
    for (t, properties) in by_time {
        group.insert(Measurement {
            type_name: group.key.type_name.clone(),
            occurrence_time: t,
            ingestion_time: None,
            device_id: group.key.device_id.clone(),
            patient_id: group.key.patient_id.clone(),
            encounter_id: group.key.encounter_id.clone(),
            correlation_id: group.key.correlation_id.clone(),
            properties,
        });
    }
    group
}

fn is_component_for(c: &ObservationComponent, value_name: &str) -> bool {
    c.code
        .coding
        .iter()
        .any(|cd| cd.system.as_deref() == Some(SERVICE_SYSTEM) && cd.code.as_deref() == Some(value_name))
}

/// The value for one value template. With `existing` (the stored value and the stored period
/// start), SampledData readings already stored are kept where no new reading takes their slot.
fn value_of(
    template: &CodeValueTemplate,
    v: &ValueTemplate,
    group: &Group,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    existing: Option<(&ObservationValue, Option<DateTime<Utc>>)>,
) -> Result<ObservationValue, ObservationError> {
    // The latest reading, for the single-valued types (their groups hold one time anyway).
    let last = group.values(&v.value_name).last().map(|(_, s)| s);
    let mut out = ObservationValue::default();
    match &v.kind {
        ValueKind::SampledData { default_period_ms, unit } => {
            let data = sampled_data(template, v, group, start, end, *default_period_ms, existing)?;
            out.value_sampled_data = Some(SampledData {
                origin: Quantity { value: Some(Number::from(0)), unit: non_empty(unit), system: None, code: None },
                period: Number::from(*default_period_ms),
                factor: None,
                lower_limit: None,
                upper_limit: None,
                dimensions: 1,
                data: Some(data),
            });
        }
        ValueKind::Quantity { unit, code, system } => {
            let n = quantity_value(template, v, last.unwrap_or_default())?;
            out.value_quantity = Some(Quantity {
                value: Some(n),
                unit: non_empty(unit),
                system: non_empty(system),
                code: non_empty(code),
            });
        }
        ValueKind::String => out.value_string = last.map(str::to_string),
        // The reading only says the concept applies; its value is not used (as in the reference).
        ValueKind::CodeableConcept { text, codes } => {
            out.value_codeable_concept =
                Some(CodeableConcept { coding: codes.iter().map(coding).collect(), text: non_empty(text) })
        }
    }
    Ok(out)
}

fn sampled_data(
    template: &CodeValueTemplate,
    v: &ValueTemplate,
    group: &Group,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    period_ms: u64,
    existing: Option<(&ObservationValue, Option<DateTime<Utc>>)>,
) -> Result<String, ObservationError> {
    let mut readings: Vec<(DateTime<Utc>, String)> = Vec::new();
    for (t, s) in group.values(&v.value_name) {
        readings.push((t, decimal(s).ok_or_else(|| not_a_number(template, v, s))?));
    }
    let stored = existing.and_then(|(value, start)| Some((value.value_sampled_data.as_ref()?, start?)));
    let too_many = |slots| ObservationError::TooManySamples {
        type_name: template.type_name.clone(),
        value_name: v.value_name.clone(),
        slots,
    };
    let data = match stored {
        // The usual merge: the same window at the same period. Laying the new readings over
        // the stored slots gives what decode-merge-rebuild gives (a new reading is never
        // earlier than the slot start a stored value is re-timed to, so it wins its slot),
        // without re-timing and sorting every stored slot at every flush.
        Some((old, old_start))
            if old_start == start
                && old.period.as_f64() == Some(period_ms as f64)
                && old
                    .data
                    .as_deref()
                    .is_some_and(|d| sampled::slots(start, end, period_ms) == Ok(d.split(' ').count() as u64)) =>
        {
            let old_data = old.data.as_deref().unwrap_or_default();
            sampled::overlay(old_data, readings.iter().map(|(t, s)| (*t, s.as_str())), start, period_ms)
        }
        Some((old, old_start)) => {
            if let (Some(data), Some(period)) = (old.data.as_deref(), old.period.as_f64()) {
                readings = sampled::merge(sampled::decode(data, old_start, period), readings);
            }
            sampled::build(readings.iter().map(|(t, s)| (*t, s.as_str())), start, end, period_ms).map_err(too_many)?
        }
        None => {
            sampled::build(readings.iter().map(|(t, s)| (*t, s.as_str())), start, end, period_ms).map_err(too_many)?
        }
    };
    Ok(data)
}

fn quantity_value(template: &CodeValueTemplate, v: &ValueTemplate, s: &str) -> Result<Number, ObservationError> {
    serde_json::from_str(&decimal(s).ok_or_else(|| not_a_number(template, v, s))?)
        .map_err(|_| not_a_number(template, v, s))
}

fn not_a_number(template: &CodeValueTemplate, v: &ValueTemplate, value: &str) -> ObservationError {
    ObservationError::NotANumber {
        type_name: template.type_name.clone(),
        value_name: v.value_name.clone(),
        value: value.to_string(),
        value_type: v.kind.name(),
    }
}

/// The reading as a FHIR decimal, if it is one.
fn decimal(s: &str) -> Option<String> {
    let t = s.trim();
    serde_json::from_str::<Number>(t).ok().map(|_| t.to_string())
}

/// FHIR forbids empty strings; the reference writes `"unit": ""` for an empty unit, we omit it.
fn non_empty(s: &Option<String>) -> Option<String> {
    s.as_ref().filter(|s| !s.is_empty()).cloned()
}

fn coding(c: &Code) -> Coding {
    Coding { system: non_empty(&c.system), code: non_empty(&c.code), display: non_empty(&c.display), extra: Map::new() }
}

/// The template's codes plus the connector's own coding for the name, with the name as text.
fn concept(codes: &[Code], name: &str) -> CodeableConcept {
    let mut coding: Vec<Coding> = codes.iter().map(self::coding).collect();
    coding.push(Coding {
        system: Some(SERVICE_SYSTEM.into()),
        code: Some(name.into()),
        display: Some(name.into()),
        extra: Map::new(),
    });
    CodeableConcept { coding, text: Some(name.into()) }
}

fn categories(t: &CodeValueTemplate) -> Vec<CodeableConcept> {
    t.category
        .iter()
        .map(|c| CodeableConcept { coding: c.codes.iter().map(coding).collect(), text: non_empty(&c.text) })
        .collect()
}

fn reference(kind: &str, id: &str) -> Reference {
    Reference { reference: Some(format!("{kind}/{id}")), extra: Map::new() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::group::Grouper;
    use crate::template::fhir::FhirMapping;

    #[test]
    fn an_observation_reads_back_as_the_group_it_came_from() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/mappings/fhirmapping.json"))
            .unwrap_or_default();
        let fhir = FhirMapping::parse(&text).unwrap_or_else(|e| panic!("{e}"));
        let at = |s: &str| time::parse(s).unwrap_or_default();
        let m = |t: &str, ty: &str, props: &[(&str, &str)]| Measurement {
            type_name: ty.into(),
            occurrence_time: at(t),
            ingestion_time: None,
            device_id: "d".into(),
            patient_id: Some("p".into()),
            encounter_id: None,
            correlation_id: None,
            properties: props.iter().map(|(n, v)| Property { name: (*n).into(), value: (*v).into() }).collect(),
        };
        let mut g = Grouper::default();
        for r in [
            m("2026-01-01T10:00:01Z", "heartrate", &[("hr", "70")]),
            m("2026-01-01T10:00:03Z", "heartrate", &[("hr", "72")]),
            m("2026-01-01T10:00:05Z", "bloodpressure", &[("systolic", "120"), ("diastolic", "80")]),
        ] {
            g.add(&fhir, r).unwrap_or_else(|e| panic!("{e}"));
        }
        let id = Identity { patient_id: "p".into(), device_id: "d".into(), encounter_id: None };
        for group in g.into_groups() {
            let t = fhir.template(&group.key.type_name).unwrap_or_else(|| panic!("template"));
            let obs = build(t, &group, &id, Utc::now()).unwrap_or_else(|e| panic!("{e}"));
            let back = as_group(&obs, t, group.key.clone());
            let flat = |g: &Group| {
                let mut v: Vec<(DateTime<Utc>, String, String)> = g
                    .readings
                    .iter()
                    .flat_map(|(t, m)| m.properties.iter().map(|p| (*t, p.name.to_string(), p.value.clone())))
                    .collect();
                v.sort();
                v
            };
            assert_eq!(flat(&back), flat(&group), "{}", group.key.type_name);
        }
    }
}
