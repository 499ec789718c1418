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
/// `amqp://***@host`, also without a scheme), the key of a connection string
/// (`SharedAccessKey=…`) and a PostgreSQL password (`password=…`, quoted or not, also as a URL
/// query parameter): fit for errors, logs and endpoints.
pub fn redact(text: &str) -> String {
    // First, or an `@` inside the password would be taken for the end of a URL's user part.
    let text = &redact_password(text);
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

/// libpq's `password=secret` or `password='it\'s secret'`, and `?password=secret&…` in a URL.
fn redact_password(text: &str) -> String {
    const KEY: &str = "password=";
    let Some(i) = text.to_ascii_lowercase().find(KEY) else { return text.to_string() };
    let from = i + KEY.len();
    let rest = &text[from..];
    let len = if let Some(quoted) = rest.strip_prefix('\'') {
        // libpq escapes a quote inside as \'; the value ends at the first quote not escaped.
        let bytes = quoted.as_bytes();
        let mut k = 0;
        while k < bytes.len() {
            match bytes[k] {
                b'\\' => k += 2,
                b'\'' => break,
                _ => k += 1,
            }
        }
        (k + 2).min(rest.len())
    } else {
        rest.find(|c: char| c.is_whitespace() || c == '&' || c == ';').unwrap_or(rest.len())
    };
    format!("{}***{}", &text[..from], redact_password(&rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn postgres_passwords_are_hidden_in_both_forms() {
        assert_eq!(redact("host=db user=iomt password=p@ss dbname=x"), "host=db user=iomt password=*** dbname=x");
        assert_eq!(redact(r"host=db password='a b\' c' dbname=x"), "host=db password=*** dbname=x");
        assert_eq!(
            redact("postgres://db/x?user=u&password=s3cret&sslmode=require"),
            "postgres://db/x?user=u&password=***&sslmode=require"
        );
        assert_eq!(redact("postgres://u:s3cret@db/x"), "postgres://***@db/x");
    }

    #[test]
    fn secrets_are_hidden_with_or_without_a_scheme() {
        assert_eq!(redact("amqp://guest:s3cret@host:5672/%2f"), "amqp://***@host:5672/%2f");
        assert_eq!(redact("guest:s3cret@host:5672"), "***@host:5672");
        assert_eq!(redact("amqp://host"), "amqp://host");
        let cs = "Endpoint=sb://x/;SharedAccessKeyName=a;SharedAccessKey=s3cret=;EntityPath=h";
        assert_eq!(redact(cs), "Endpoint=sb://x/;SharedAccessKeyName=a;SharedAccessKey=***;EntityPath=h");
    }
}
