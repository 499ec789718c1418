//! Arbitrary bytes as a device message, through fixed, realistic mappings: the sample pair and
//! every conformance vector's. Must never panic, hang or exhaust memory; errors are fine.
//!
//! Input: byte 0 picks the mapping pair, byte 1 how the rest is read (bit 0: a whole
//! `{"Body", "Properties", "SystemProperties"}` envelope, as `normalize --envelope` reads a file;
//! else a body as the sources read it, with IoT Hub system properties when bit 1 is set).

#![no_main]

use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| common::on_service_stack(|| {
    let [pick, how, body @ ..] = data else {
        return;
    };
    let f = common::fixtures();
    let pair = &f.pairs[*pick as usize % f.pairs.len()];
    let event = if how & 1 == 1 {
        serde_json::from_slice(body).map_err(|e| e.to_string())
    } else {
        let system = if how & 2 == 2 { common::iothub_properties() } else { Default::default() };
        common::delivered(body, system)
    };
    let _ = pair.device.normalize_body(body);
    common::exercise(&pair.device, &pair.fhir, event);
}));
