//! The device simulator: realistic messages for the sample mappings, published to RabbitMQ at a
//! set rate with publisher confirms, each stamped with its send time (`x-iomt-sent-at`).

use serde_json::{Value, json};
use std::io::Write;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Heart rate and SpO2 as 1 Hz streams (SampledData windows): few devices, many readings.
    Vitals,
    /// Blood pressure, glucose and temperature as spot readings (instant Observations).
    Spot,
    /// Vitals and spot readings interleaved.
    Mixed,
}

pub struct Plan {
    /// Where to send: the source whose publisher is used.
    pub target: Box<dyn crate::source::Source>,
    pub devices: usize,
    /// Messages per second in total; 0 for as fast as the broker confirms.
    pub rate: f64,
    pub duration: Option<Duration>,
    pub count: Option<u64>,
    pub profile: Profile,
    /// Device and patient ids are `{prefix}-dev-{n}` and `{prefix}-pat-{n}`.
    pub prefix: String,
    pub in_flight: usize,
    pub progress: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub sent: u64,
    pub confirmed: u64,
    pub refused: u64,
    pub elapsed: Duration,
}

impl Summary {
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// One message body for device `d`, its `k`-th message, at `now`.
pub fn message(
    profile: Profile,
    prefix: &str,
    d: usize,
    k: u64,
    rng: &mut fastrand::Rng,
    now: chrono::DateTime<chrono::Utc>,
) -> Value {
    let time = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut m = json!({"deviceId": format!("{prefix}-dev-{d}"), "patientId": format!("{prefix}-pat-{d}")});
    let kind = match profile {
        Profile::Vitals => k % 2,
        Profile::Spot => 2 + k % 3,
        Profile::Mixed => k % 5,
    };
    // Plausible values, varying per device and reading.
    let wobble = |rng: &mut fastrand::Rng, spread: i64| rng.i64(-spread..=spread);
    match kind {
        0 => {
            m["heartRate"] = json!(70 + (d % 15) as i64 + wobble(rng, 5));
            m["measurementTime"] = json!(time);
        }
        1 => {
            m["spo2"] = json!((97 + wobble(rng, 2)).min(100));
            m["measurementTime"] = json!(time);
        }
        2 => {
            m["systolic"] = json!(118 + (d % 20) as i64 + wobble(rng, 8));
            m["diastolic"] = json!(76 + (d % 10) as i64 + wobble(rng, 5));
            m["measurementTime"] = json!(time);
        }
        3 => {
            m["glucoseMgDl"] = json!(95 + (d % 30) as i64 + wobble(rng, 12));
            m["timestampMs"] = json!(now.timestamp_millis());
        }
        _ => {
            m["bodyTemperature"] = json!(36.4 + (rng.i64(0..=10) as f64) / 10.0);
            m["measurementTime"] = json!(time);
        }
    }
    m
}

pub async fn run(plan: &Plan) -> Result<Summary, String> {
    let mut publisher = plan.target.publisher(plan.in_flight).await?;
    let mut rng = fastrand::Rng::with_seed(42);
    let start = Instant::now();
    let mut last_progress = Instant::now();
    let mut k: u64 = 0;
    let devices = plan.devices.max(1);
    loop {
        if plan.count.is_some_and(|c| k >= c) || plan.duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        if plan.rate > 0.0 {
            let due = start + Duration::from_secs_f64(k as f64 / plan.rate);
            let now = Instant::now();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
        }
        let d = (k % devices as u64) as usize;
        let per_device = k / devices as u64;
        let body = message(plan.profile, &plan.prefix, d, per_device, &mut rng, chrono::Utc::now());
        let device = body.get("deviceId").and_then(|v| v.as_str());
        publisher.send(&serde_json::to_vec(&body).unwrap_or_default(), device).await?;
        k += 1;
        if plan.progress && last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            let rate = k as f64 / start.elapsed().as_secs_f64();
            eprint!("\rsent {k}, confirmed {}, {rate:.0} msg/s   ", publisher.counts().0);
            let _ = std::io::stderr().flush();
        }
    }
    publisher.flush().await?;
    if plan.progress {
        eprintln!();
    }
    let (confirmed, refused) = publisher.counts();
    Ok(Summary { sent: k, confirmed, refused, elapsed: start.elapsed() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::device::DeviceMapping;

    /// Every simulated message normalizes with the sample device mapping into its type.
    #[test]
    fn messages_fit_the_sample_mappings() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/mappings/devicecontent.json"))
            .unwrap_or_default();
        let mapping = DeviceMapping::parse(&text).unwrap_or_else(|e| panic!("{e}"));
        let mut rng = fastrand::Rng::with_seed(1);
        let mut seen = std::collections::BTreeSet::new();
        for profile in [Profile::Vitals, Profile::Spot, Profile::Mixed] {
            for k in 0..10 {
                let m = message(profile, "t", 3, k, &mut rng, chrono::Utc::now());
                let ms = mapping
                    .normalize_body(&serde_json::to_vec(&m).unwrap_or_default())
                    .unwrap_or_else(|e| panic!("{m}: {e}"));
                assert_eq!(ms.len(), 1, "{m}");
                assert_eq!(ms[0].device_id, "t-dev-3");
                seen.insert(ms[0].type_name.to_string());
            }
        }
        let want: std::collections::BTreeSet<String> =
            ["heartrate", "spo2", "bloodpressure", "bloodglucose", "bodytemperature"]
                .into_iter()
                .map(String::from)
                .collect();
        assert_eq!(seen, want);
    }
}
