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

/// `text` with the user information of an address hidden (`amqp://user:password@host` →
/// `amqp://***@host`, also without a scheme), and the key of a connection string
/// (`SharedAccessKey=…`): fit for errors, logs and endpoints.
pub fn redact(text: &str) -> String {
    let mut out = match text.rfind('@') {
        Some(at) => {
            let start = text.find("://").map_or(0, |s| s + 3);
            if at > start { format!("{}***{}", &text[..start], &text[at..]) } else { text.to_string() }
        }
        None => text.to_string(),
    };
    for key in ["SharedAccessKey=", "SharedAccessSignature=", "AccountKey="] {
        let lower = out.to_ascii_lowercase();
        if let Some(i) = lower.find(&key.to_ascii_lowercase()) {
            let from = i + key.len();
            let to = out[from..].find(';').map_or(out.len(), |e| from + e);
            out.replace_range(from..to, "***");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn secrets_are_hidden_with_or_without_a_scheme() {
        assert_eq!(redact("amqp://guest:s3cret@host:5672/%2f"), "amqp://***@host:5672/%2f");
        assert_eq!(redact("guest:s3cret@host:5672"), "***@host:5672");
        assert_eq!(redact("amqp://host"), "amqp://host");
        let cs = "Endpoint=sb://x/;SharedAccessKeyName=a;SharedAccessKey=s3cret=;EntityPath=h";
        assert_eq!(redact(cs), "Endpoint=sb://x/;SharedAccessKeyName=a;SharedAccessKey=***;EntityPath=h");
    }
}
