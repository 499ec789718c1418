//! iomt-connector: device messages to FHIR R4 Observations, with Azure MedTech mapping files.

pub mod config;
pub mod deadletters;
pub mod engine;
pub mod fhir;
pub mod http;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod problems;
pub mod service;
pub mod simulate;
pub mod source;
pub mod status;
pub mod studio;
pub mod template;
pub mod transform;
