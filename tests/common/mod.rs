//! Helpers shared by the integration tests.

#![allow(dead_code)]

pub mod services;
pub mod vitals;

use std::path::PathBuf;
/// `tests/conformance`, the reference vectors this repository carries (`IOMT_CONFORMANCE_DIR`
/// overrides). Missing vectors fail the test loudly.
pub fn conformance_dir() -> PathBuf {
    let dir = std::env::var_os("IOMT_CONFORMANCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/conformance"));
    assert!(
        dir.join("README.md").is_file(),
        "conformance vectors not found in {}; set IOMT_CONFORMANCE_DIR",
        dir.display()
    );
    dir
}
