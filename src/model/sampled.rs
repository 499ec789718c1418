//! SampledData: readings laid into fixed slots of `period` ms from a start time, "E" where a slot
//! has none; the last reading in a slot wins.

use chrono::{DateTime, TimeDelta, Utc};

/// Builds the data string over slots `[start + k*period, start + (k+1)*period)` for every slot
/// that starts at or before `end`. `values` must be in time order; readings before `start` or
/// past the last slot are dropped (a reading after `end` inside the last slot is kept, as in the
/// reference).
pub fn build<'a>(
    values: impl IntoIterator<Item = (DateTime<Utc>, &'a str)>,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    period_ms: u64,
) -> String {
    let period = period_ms.max(1) as i128 * 1_000_000;
    let span = nanos(end - start);
    let slots = if span < 0 {
        0
    } else {
        (span / period + 1) as usize
    };
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
    out
}

/// Reads a data string back into timed readings (slot start times); empty and error markers
/// (E, U, L) are skipped.
pub fn decode(data: &str, start: DateTime<Utc>, period_ms: f64) -> Vec<(DateTime<Utc>, String)> {
    let period = TimeDelta::nanoseconds((period_ms * 1_000_000.0) as i64);
    data.split_whitespace()
        .enumerate()
        .filter(|(_, v)| !matches!(*v, "E" | "U" | "L"))
        .filter_map(|(i, v)| Some((start + period.checked_mul(i as i32)?, v.to_string())))
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
