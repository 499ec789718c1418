//! What settings validation finds wrong: every problem, each naming the key to fix. Shared by
//! the core settings (`config`) and each source's own section (`source/*/settings.rs`).

/// A setting that cannot be used, with the key to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration key {key}: {message}")]
    Invalid { key: String, message: String },
    /// Every problem validation found, so that one edit fixes them all.
    #[error("{} configuration problems:\n{}", .0.len(), .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Several(Vec<ConfigError>),
}

impl ConfigError {
    pub(crate) fn from_problems(mut problems: Vec<ConfigError>) -> Result<(), ConfigError> {
        match problems.len() {
            0 => Ok(()),
            1 => Err(problems.remove(0)),
            _ => Err(ConfigError::Several(problems)),
        }
    }
}

/// Collects what validation finds wrong.
#[derive(Default)]
pub(crate) struct Problems(pub(crate) Vec<ConfigError>);

impl Problems {
    pub(crate) fn bad(&mut self, key: &str, message: impl Into<String>) {
        self.0.push(ConfigError::Invalid { key: key.to_string(), message: message.into() });
    }
}
