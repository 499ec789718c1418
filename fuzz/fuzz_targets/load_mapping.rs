//! Arbitrary bytes as a mapping file: loaded as a device mapping (beside the sample FHIR mapping)
//! and as a FHIR mapping (beside the sample device mapping), as `validate` and the service's
//! loads do, and, as far as it loads, used on the sample messages. Must never panic, hang or
//! exhaust memory.
//!
//! Input: the mapping text, then optionally a NUL byte and one more message body to try.

#![no_main]

use iomt_connector::engine;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| common::on_service_stack(|| {
    let (text, message) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    // Files are read as UTF-8 and refused otherwise; lossy decoding keeps such inputs useful.
    let text = String::from_utf8_lossy(text);
    let f = common::fixtures();
    let _ = engine::version(&text, &f.sample_fhir_text);

    let as_device = engine::check(&text, Some(&f.sample_fhir_text), "fhir.json");
    let as_fhir = engine::check(&f.sample_device_text, Some(&text), "fhir.json");
    let _ = as_device.report.problem_count() + as_fhir.report.problem_count();
    let (Some(sample_fhir), Some(fuzzed_fhir)) = (&as_device.fhir, &as_fhir.fhir) else {
        return;
    };
    // A few messages only: every input runs them all, and speed is coverage.
    let messages = f.messages.iter().take(8).map(Vec::as_slice).chain(message);
    for body in messages {
        // What loaded of each, as the mapping debugger runs a partly valid mapping.
        common::exercise(&as_device.device, sample_fhir, common::delivered(body, common::iothub_properties()));
        common::exercise(&as_fhir.device, fuzzed_fhir, common::delivered(body, Default::default()));
    }
}));
