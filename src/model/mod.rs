//! The data that flows between the stages: measurements, their groups, and the Observations built
//! from them (identifiers, SampledData codec, merge into an existing resource).

pub mod group;
pub mod ids;
pub mod kind;
pub mod measurement;
pub mod observation;
pub mod sampled;
pub mod time;
