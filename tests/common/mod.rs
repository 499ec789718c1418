//! Helpers shared by the integration tests.

#![allow(dead_code)]

pub mod services;
pub mod vitals;

use std::path::PathBuf;
/// `../shared/conformance`, where the reference vectors live (read in place, never copied).
/// `IOMT_CONFORMANCE_DIR` overrides; a checkout elsewhere falls back to the workplace's copy.
/// Missing vectors fail the test loudly.
pub fn conformance_dir() -> PathBuf {
    let candidates = [
        std::env::var_os("IOMT_CONFORMANCE_DIR").map(PathBuf::from),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance")),
        Some(PathBuf::from("/work/shared/conformance")),
    ];
    let found = candidates.iter().flatten().find(|d| d.join("README.md").is_file());
    match found {
        Some(d) => d.clone(),
        None => panic!("conformance vectors not found (looked in {candidates:?}); set IOMT_CONFORMANCE_DIR"),
    }
}
