//! Timestamps: parsing what devices send, and the text forms FHIR and identifiers use.

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, TimeDelta, Utc};

/// One .NET tick (100 ns): the resolution of the reference's period boundaries (an hour ends
/// at hh:59:59.9999999).
pub const TICK: TimeDelta = TimeDelta::nanoseconds(100);

/// Parses a device timestamp. Offsets are converted to UTC; a timestamp without an offset is taken
/// as UTC (as the MedTech docs state).
pub fn parse(s: &str) -> Option<DateTime<Utc>> {
    use chrono::Datelike;
    // Years 1-9999, the reference's range: window arithmetic (a day past the end) cannot overflow.
    parse_any(s).filter(|t| (1..=9999).contains(&t.year()))
}

fn parse_any(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for f in ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z"] {
        if let Ok(t) = DateTime::parse_from_str(s, f) {
            return Some(t.with_timezone(&Utc));
        }
    }
    for f in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Some(t.and_utc());
        }
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d").ok().and_then(|d| d.and_hms_opt(0, 0, 0)).map(|t| t.and_utc())
}

/// RFC 3339, UTC, milliseconds: the normalized measurement's form.
pub fn millis(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// FHIR dateTime with seven fractional digits, as the reference writes period boundaries.
pub fn fhir(t: DateTime<Utc>) -> String {
    format!("{}.{:07}Z", t.format("%Y-%m-%dT%H:%M:%S"), t.timestamp_subsec_nanos() / 100)
}

/// `yyyyMMddHHmmssZ`: the reference's identifier segment for a time window.
pub fn id_seconds(t: DateTime<Utc>) -> String {
    t.format("%Y%m%d%H%M%SZ").to_string()
}

/// `yyyyMMddHHmmssfffZ`: instant identifiers keep milliseconds so two readings in one second do
/// not collide (a deliberate difference from the reference).
pub fn id_millis(t: DateTime<Utc>) -> String {
    t.format("%Y%m%d%H%M%S%3fZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_devices_send() {
        let z = parse("2019-02-01T22:46:01.875Z");
        assert_eq!(parse("2019-02-01T22:46:01.8750000Z"), z);
        assert_eq!(parse("2019-02-01T22:46:01.8750000"), z);
        assert_eq!(parse("2019-02-01T23:46:01.875+01:00"), z);
        assert_eq!(parse("2019-02-01 22:46:01.875"), z);
        assert!(parse("2019-02-01").is_some());
        assert!(parse("yesterday").is_none());
        assert!(parse("1625677200").is_none());
        assert!(parse("+262143-12-31T23:30:00").is_none(), "outside years 1-9999");
    }

    #[test]
    fn formats() {
        let t = parse("2019-02-01T22:46:01.875Z").unwrap_or_default();
        assert_eq!(millis(t), "2019-02-01T22:46:01.875Z");
        assert_eq!(fhir(t), "2019-02-01T22:46:01.8750000Z");
        assert_eq!(id_seconds(t), "20190201224601Z");
        assert_eq!(id_millis(t), "20190201224601875Z");
    }
}
