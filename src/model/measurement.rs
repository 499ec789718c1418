//! A normalized measurement: what a device template projects out of a message.

use chrono::{DateTime, Utc};
use serde::ser::{Serialize, SerializeStruct, Serializer};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// Shared with the template that produced it (no copy per reading).
    pub type_name: Arc<str>,
    pub occurrence_time: DateTime<Utc>,
    /// When the broker took the message in; orders readings with equal occurrence times (the
    /// latest ingested wins).
    pub ingestion_time: Option<DateTime<Utc>>,
    pub device_id: String,
    pub patient_id: Option<String>,
    pub encounter_id: Option<String>,
    pub correlation_id: Option<String>,
    pub properties: Vec<Property>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Property {
    pub name: Arc<str>,
    /// Always text, as in the reference: numbers keep their JSON form.
    pub value: String,
}

impl Measurement {
    pub fn value(&self, name: &str) -> Option<&str> {
        self.properties.iter().find(|p| &*p.name == name).map(|p| p.value.as_str())
    }
}

/// The command line's contract: camelCase, absent ids as null, time in UTC with milliseconds.
impl Serialize for Measurement {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Measurement", 7)?;
        st.serialize_field("type", &self.type_name)?;
        st.serialize_field("occurrenceTimeUtc", &super::time::millis(self.occurrence_time))?;
        st.serialize_field("deviceId", &self.device_id)?;
        st.serialize_field("patientId", &self.patient_id)?;
        st.serialize_field("encounterId", &self.encounter_id)?;
        st.serialize_field("correlationId", &self.correlation_id)?;
        st.serialize_field("properties", &self.properties)?;
        st.end()
    }
}
