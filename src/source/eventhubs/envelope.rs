//! An AMQP message as the JSON evaluation envelope the mappings see.

use super::SENT_AT_PROPERTY;
use azure_core_amqp::message::{AmqpAnnotationKey, AmqpMessageBody, AmqpMessageId};
use azure_core_amqp::{AmqpMessage, AmqpSimpleValue, AmqpTimestamp, AmqpValue};
use serde_json::{Map, Value, json};
use std::time::{Duration, SystemTime};

/// `{"Body", "Properties", "SystemProperties"}` of an event, as iomt-fhir builds it from the
/// .NET `EventData`: the body parsed as JSON (`null` when empty), the application properties, and
/// the system properties: the AMQP properties section's fields that are set, then every message
/// annotation (`x-opt-sequence-number`, `x-opt-offset`, `x-opt-enqueued-time`, IoT Hub's
/// `iothub-connection-device-id`, ...). `Err` when the body is not JSON.
pub fn envelope(m: &AmqpMessage) -> Result<Value, String> {
    let body = crate::source::body_json(&body_bytes(m), "event")?;
    let mut properties = Map::new();
    if let Some(app) = &m.application_properties {
        for (k, v) in app.0.iter() {
            properties.insert(k.clone(), simple_json(v));
        }
    }
    let mut system = Map::new();
    if let Some(p) = &m.properties {
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                system.insert(k.to_string(), v);
            }
        };
        put("message-id", p.message_id.as_ref().map(message_id_json));
        put("user-id", p.user_id.as_ref().map(|u| Value::String(azure_core::base64::encode(u))));
        put("to", p.to.clone().map(Value::String));
        put("subject", p.subject.clone().map(Value::String));
        put("reply-to", p.reply_to.clone().map(Value::String));
        put("correlation-id", p.correlation_id.as_ref().map(message_id_json));
        put("content-type", p.content_type.as_ref().map(|s| Value::String(s.0.clone())));
        put("content-encoding", p.content_encoding.as_ref().map(|s| Value::String(s.0.clone())));
        put("absolute-expiry-time", p.absolute_expiry_time.as_ref().map(timestamp_json));
        put("creation-time", p.creation_time.as_ref().map(timestamp_json));
        put("group-id", p.group_id.clone().map(Value::String));
        put("group-sequence", p.group_sequence.map(|n| json!(n)));
        put("reply-to-group-id", p.reply_to_group_id.clone().map(Value::String));
    }
    if let Some(a) = &m.message_annotations {
        for (k, v) in a.0.iter() {
            system.insert(annotation_key(k), value_json(v));
        }
    }
    Ok(crate::source::envelope(body, properties, system))
}

/// The body's size, without copying it.
pub fn body_len(m: &AmqpMessage) -> usize {
    match &m.body {
        AmqpMessageBody::Binary(sections) => sections.iter().map(Vec::len).sum(),
        AmqpMessageBody::Value(AmqpValue::String(s)) => s.len(),
        AmqpMessageBody::Value(AmqpValue::Binary(b)) => b.len(),
        _ => 0,
    }
}

fn body_bytes(m: &AmqpMessage) -> Vec<u8> {
    match &m.body {
        AmqpMessageBody::Binary(sections) => sections.concat(),
        AmqpMessageBody::Value(AmqpValue::String(s)) => s.clone().into_bytes(),
        AmqpMessageBody::Value(AmqpValue::Binary(b)) => b.clone(),
        AmqpMessageBody::Value(AmqpValue::Null) | AmqpMessageBody::Empty => Vec::new(),
        // A body that is an AMQP value or list is not a JSON document; say so as a parse error.
        AmqpMessageBody::Value(v) => format!("{v:?}").into_bytes(),
        AmqpMessageBody::Sequence(_) => b"(an AMQP sequence body)".to_vec(),
    }
}

pub(super) fn annotation_key(k: &AmqpAnnotationKey) -> String {
    match k {
        AmqpAnnotationKey::Symbol(s) => s.0.clone(),
        AmqpAnnotationKey::Ulong(n) => n.to_string(),
    }
}

fn message_id_json(id: &AmqpMessageId) -> Value {
    match id {
        AmqpMessageId::String(s) => Value::String(s.clone()),
        AmqpMessageId::Uuid(u) => Value::String(u.to_string()),
        AmqpMessageId::Binary(b) => Value::String(azure_core::base64::encode(b)),
        AmqpMessageId::Ulong(n) => json!(n),
    }
}

/// As Json.NET writes a UTC `DateTime`: seconds fraction without trailing zeros, `Z`.
fn timestamp_json(t: &AmqpTimestamp) -> Value {
    match t.0 {
        Some(t) => Value::String(iso_time(t)),
        None => Value::Null,
    }
}

fn iso_time(t: SystemTime) -> String {
    let t: chrono::DateTime<chrono::Utc> = t.into();
    // .NET keeps 100 ns ticks: seven digits at most, trailing zeros dropped.
    let s = t.format("%Y-%m-%dT%H:%M:%S%.9f").to_string();
    let s = &s[..s.len() - 2];
    format!("{}Z", s.trim_end_matches('0').trim_end_matches('.'))
}

fn simple_json(v: &AmqpSimpleValue) -> Value {
    match v {
        AmqpSimpleValue::Null => Value::Null,
        AmqpSimpleValue::Boolean(b) => json!(b),
        AmqpSimpleValue::UByte(n) => json!(n),
        AmqpSimpleValue::Byte(n) => json!(n),
        AmqpSimpleValue::Char(c) => json!(c.to_string()),
        AmqpSimpleValue::UShort(n) => json!(n),
        AmqpSimpleValue::Short(n) => json!(n),
        AmqpSimpleValue::UInt(n) => json!(n),
        AmqpSimpleValue::Int(n) => json!(n),
        AmqpSimpleValue::ULong(n) => json!(n),
        AmqpSimpleValue::Long(n) => json!(n),
        AmqpSimpleValue::Float(f) => json!(f),
        AmqpSimpleValue::Double(f) => json!(f),
        AmqpSimpleValue::TimeStamp(t) => timestamp_json(t),
        AmqpSimpleValue::Uuid(u) => json!(u.to_string()),
        AmqpSimpleValue::String(s) => json!(s),
        AmqpSimpleValue::Symbol(s) => json!(s.0),
        AmqpSimpleValue::Binary(b) => json!(azure_core::base64::encode(b)),
        other => json!(format!("{other:?}")),
    }
}

fn value_json(v: &AmqpValue) -> Value {
    match v {
        AmqpValue::Null => Value::Null,
        AmqpValue::Boolean(b) => json!(b),
        AmqpValue::UByte(n) => json!(n),
        AmqpValue::UShort(n) => json!(n),
        AmqpValue::UInt(n) => json!(n),
        AmqpValue::ULong(n) => json!(n),
        AmqpValue::Byte(n) => json!(n),
        AmqpValue::Short(n) => json!(n),
        AmqpValue::Int(n) => json!(n),
        AmqpValue::Long(n) => json!(n),
        AmqpValue::Float(f) => json!(f),
        AmqpValue::Double(f) => json!(f),
        AmqpValue::Char(c) => json!(c.to_string()),
        AmqpValue::TimeStamp(t) => timestamp_json(t),
        AmqpValue::Uuid(u) => json!(u.to_string()),
        AmqpValue::Binary(b) => json!(azure_core::base64::encode(b)),
        AmqpValue::String(s) => json!(s),
        AmqpValue::Symbol(s) => json!(s.0),
        AmqpValue::List(l) => Value::Array(l.0.iter().map(value_json).collect()),
        AmqpValue::Array(a) => Value::Array(a.iter().map(value_json).collect()),
        AmqpValue::Map(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let key = match k {
                        AmqpValue::String(s) => s.clone(),
                        AmqpValue::Symbol(s) => s.0.clone(),
                        other => value_json(other).to_string(),
                    };
                    (key, value_json(v))
                })
                .collect(),
        ),
        other => json!(format!("{other:?}")),
    }
}

pub(super) fn sent_at(m: &AmqpMessage) -> Option<SystemTime> {
    let v = m.application_properties.as_ref()?.0.get(SENT_AT_PROPERTY)?;
    let ms = match v {
        AmqpSimpleValue::Long(n) => *n,
        AmqpSimpleValue::ULong(n) => *n as i64,
        AmqpSimpleValue::Int(n) => i64::from(*n),
        _ => return None,
    };
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(u64::try_from(ms).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core_amqp::AmqpSymbol;
    use azure_core_amqp::message::{AmqpAnnotations, AmqpApplicationProperties, AmqpMessageProperties};

    #[test]
    fn an_iot_hub_routed_event_becomes_the_envelope_iomt_fhir_builds() {
        let mut app = AmqpApplicationProperties::new();
        app.0.insert("iothub-creation-time-utc".into(), AmqpSimpleValue::String("2019-01-30T22:45:02.6073744Z".into()));
        app.0.insert("batchsize".into(), AmqpSimpleValue::String("60".into()));
        let mut ann = AmqpAnnotations::new();
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_549_061_161_875);
        ann.0.insert(
            AmqpAnnotationKey::Symbol(AmqpSymbol("iothub-connection-device-id".into())),
            AmqpValue::String("ev-d795".into()),
        );
        ann.0.insert(
            AmqpAnnotationKey::Symbol(AmqpSymbol("iothub-enqueuedtime".into())),
            AmqpValue::TimeStamp(AmqpTimestamp(Some(t))),
        );
        ann.0.insert(AmqpAnnotationKey::Symbol(AmqpSymbol("x-opt-sequence-number".into())), AmqpValue::Long(7));
        ann.0.insert(AmqpAnnotationKey::Symbol(AmqpSymbol("x-opt-offset".into())), AmqpValue::String("1024".into()));
        let m = AmqpMessage {
            body: AmqpMessageBody::Binary(vec![br#"{"heartrate": "#.to_vec(), br#""203"}"#.to_vec()]),
            application_properties: Some(app),
            message_annotations: Some(ann),
            properties: Some(AmqpMessageProperties {
                message_id: Some(AmqpMessageId::String("m-1".into())),
                content_type: Some(AmqpSymbol("application/json".into())),
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = envelope(&m).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e["Body"], json!({"heartrate": "203"}));
        assert_eq!(e["Properties"]["iothub-creation-time-utc"], "2019-01-30T22:45:02.6073744Z");
        let sys = &e["SystemProperties"];
        assert_eq!(sys["iothub-connection-device-id"], "ev-d795");
        assert_eq!(sys["iothub-enqueuedtime"], "2019-02-01T22:46:01.875Z");
        assert_eq!(sys["x-opt-sequence-number"], 7);
        assert_eq!(sys["x-opt-offset"], "1024");
        assert_eq!(sys["message-id"], "m-1");
        assert_eq!(sys["content-type"], "application/json");
    }

    #[test]
    fn an_empty_body_is_null_and_a_bad_one_is_an_error() {
        let m = AmqpMessage::default();
        assert_eq!(envelope(&m).map(|e| e["Body"].clone()), Ok(Value::Null));
        let bad = AmqpMessage { body: AmqpMessageBody::Binary(vec![b"{nope".to_vec()]), ..Default::default() };
        assert!(envelope(&bad).is_err_and(|e| e.contains("not valid JSON")));
    }
}
