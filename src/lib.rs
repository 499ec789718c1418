//! iomt-connector: device messages to FHIR R4 Observations, with Azure MedTech mapping files.

pub mod model;
pub mod template;
pub mod transform;
