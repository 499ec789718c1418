//! SampledData: readings laid into fixed slots of `period` ms from a start time, "E" where a slot
//! has none; the last reading in a slot wins.

use chrono::{DateTime, TimeDelta, Utc};

/// The most slots one SampledData may hold (an hour at 1 kHz is 3.6 M); a wider window is refused
/// rather than allocated.
pub const MAX_SLOTS: u64 = 10_000_000;

/// Builds the data string over slots `[start + k*period, start + (k+1)*period)` for every slot
/// that starts at or before `end`. `values` must be in time order; readings before `start` or
/// past the last slot are dropped (a reading after `end` inside the last slot is kept, as in the
/// reference). `Err(slots)` when the window needs more than [`MAX_SLOTS`].
pub fn build<'a>(
    values: impl IntoIterator<Item = (DateTime<Utc>, &'a str)>,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    period_ms: u64,
) -> Result<String, u64> {
    let period = period_ms.max(1) as i128 * 1_000_000;
    let span = nanos(end - start);
    let slots = if span < 0 { 0 } else { span / period + 1 };
    if slots > MAX_SLOTS as i128 {
        return Err(u64::try_from(slots).unwrap_or(u64::MAX));
    }
    let slots = slots as usize;
    let mut data: Vec<Option<&str>> = vec![None; slots];
    for (t, v) in values {
        let offset = nanos(t - start);
        if offset < 0 {
            continue;
        }
        if let Some(slot) = data.get_mut((offset / period) as usize) {
            *slot = Some(v);
        }
    }
    let mut out = String::with_capacity(slots * 3);
    for (i, v) in data.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(v.unwrap_or("E"));
    }
    Ok(out)
}

/// How many slots `[start, end]` holds at `period_ms`; `Err(slots)` past [`MAX_SLOTS`].
pub fn slots(start: DateTime<Utc>, end: DateTime<Utc>, period_ms: u64) -> Result<u64, u64> {
    let period = period_ms.max(1) as i128 * 1_000_000;
    let span = nanos(end - start);
    let n = if span < 0 { 0 } else { span / period + 1 };
    if n > MAX_SLOTS as i128 { Err(u64::try_from(n).unwrap_or(u64::MAX)) } else { Ok(n as u64) }
}

/// `data` (a stored data string whose slots start at `start`) with `values` (in time order) laid
/// over it: each reading replaces its slot's value; readings outside the slots are dropped.
pub fn overlay<'a>(
    data: &str,
    values: impl IntoIterator<Item = (DateTime<Utc>, &'a str)>,
    start: DateTime<Utc>,
    period_ms: u64,
) -> String {
    let period = period_ms.max(1) as i128 * 1_000_000;
    let mut tokens: Vec<&str> = data.split(' ').collect();
    for (t, v) in values {
        let offset = nanos(t - start);
        if offset < 0 {
            continue;
        }
        if let Some(slot) = tokens.get_mut((offset / period) as usize) {
            *slot = v;
        }
    }
    tokens.join(" ")
}

/// Reads a data string back into timed readings (slot start times); empty and error markers
/// (E, U, L) are skipped.
pub fn decode(data: &str, start: DateTime<Utc>, period_ms: f64) -> Vec<(DateTime<Utc>, String)> {
    // A stored period that is not a positive number of ms (a foreign or corrupt resource) yields
    // nothing rather than a nonsense timeline.
    if !(period_ms.is_finite() && period_ms > 0.0 && period_ms < 1e12) {
        return Vec::new();
    }
    let period = TimeDelta::nanoseconds((period_ms * 1_000_000.0) as i64);
    data.split_whitespace()
        .enumerate()
        .filter(|(_, v)| !matches!(*v, "E" | "U" | "L"))
        .filter_map(|(i, v)| {
            let offset = period.checked_mul(i32::try_from(i).ok()?)?;
            Some((start.checked_add_signed(offset)?, v.to_string()))
        })
        .collect()
}

/// Existing readings merged with new ones in time order; at equal times the new one replaces the
/// existing one (at other times in one slot it is later, and so wins the slot).
pub fn merge(
    existing: Vec<(DateTime<Utc>, String)>,
    new: Vec<(DateTime<Utc>, String)>,
) -> Vec<(DateTime<Utc>, String)> {
    let mut all = existing;
    all.extend(new);
    all.sort_by_key(|(t, _)| *t);
    let mut out: Vec<(DateTime<Utc>, String)> = Vec::with_capacity(all.len());
    for r in all {
        match out.last_mut() {
            Some(last) if last.0 == r.0 => *last = r,
            _ => out.push(r),
        }
    }
    out
}

fn nanos(d: TimeDelta) -> i128 {
    d.num_seconds() as i128 * 1_000_000_000 + d.subsec_nanos() as i128
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::time::parse;

    #[test]
    fn a_window_too_wide_is_refused_not_allocated() {
        let (s, e) = (parse("2019-01-01T00:00:00Z"), parse("2020-01-01T00:00:00Z"));
        let (s, e) = (s.unwrap_or_default(), e.unwrap_or_default());
        assert!(build([(s, "1")], s, e, 1).is_err());
        assert_eq!(build([(s, "1")], s, s, 1000), Ok("1".to_string()));
    }

    #[test]
    fn overlay_equals_decode_merge_build() {
        let s = parse("2019-01-01T00:00:00Z").unwrap_or_default();
        let e = s + TimeDelta::minutes(10) - TimeDelta::nanoseconds(100);
        let old = build([(s, "1"), (s + TimeDelta::minutes(2), "2"), (s + TimeDelta::minutes(5), "5")], s, e, 60_000)
            .unwrap_or_default();
        let new = [
            (s + TimeDelta::seconds(150), "70"),
            (s + TimeDelta::minutes(3), "71"),
            (s + TimeDelta::seconds(599), "99"),
        ];
        let merged = merge(decode(&old, s, 60_000.0), new.iter().map(|(t, v)| (*t, v.to_string())).collect());
        let slow = build(merged.iter().map(|(t, v)| (*t, v.as_str())), s, e, 60_000).unwrap_or_default();
        assert_eq!(overlay(&old, new, s, 60_000), slow);
        assert_eq!(slow, "1 E 70 71 E 5 E E E 99");
    }

    #[test]
    fn readings_before_the_start_are_dropped() {
        let s = parse("2019-01-01T00:00:10Z").unwrap_or_default();
        let before = parse("2019-01-01T00:00:09Z").unwrap_or_default();
        assert_eq!(build([(before, "1")], s, s + TimeDelta::seconds(1), 1000), Ok("E E".to_string()));
    }
}
