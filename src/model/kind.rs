//! Why a message was not (wholly) persisted, as a typed value: the `x-iomt-error-kind` header and
//! the `kind` label of `iomt_dead_lettered_total` are its text.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The message body is larger than `pipeline.max_message_bytes`.
    MessageTooLarge,
    /// The message body is not JSON.
    InvalidJson,
    /// An expression failed on the message.
    ExpressionError,
    /// A required value is absent, null or empty.
    MissingValue,
    /// No device template matched (with `broker.unmatched = "dead-letter"`).
    NoTemplateMatched,
    /// A measurement type has no FHIR template.
    NoFhirTemplate,
    /// A correlation-id window without the correlation id.
    MissingCorrelationId,
    /// A value the FHIR template cannot hold (a SampledData reading that is not a number).
    InvalidValue,
    /// More SampledData slots than a window may hold.
    WindowTooLarge,
    /// A device, patient, encounter or correlation id longer than `engine::MAX_IDENTIFIER_BYTES`.
    IdentifierTooLong,
    IdentityNotFound,
    IdentityAmbiguous,
    /// The identity mode needs an id the message does not carry.
    IdentityNotDefined,
    PatientMismatch,
    EncounterNotFound,
    /// The FHIR server refused the write (4xx other than 408/429).
    FhirRejected,
    /// The FHIR server stayed unavailable longer than `fhir.give_up_after_secs`.
    FhirUnavailable,
    FhirInvalidResponse,
    FhirAuth,
    /// The Observation kept changing under the writer.
    FhirConflict,
    /// A bug of the connector's: the message is kept rather than acked.
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::MessageTooLarge => "message-too-large",
            ErrorKind::InvalidJson => "invalid-json",
            ErrorKind::ExpressionError => "expression-error",
            ErrorKind::MissingValue => "missing-value",
            ErrorKind::NoTemplateMatched => "no-template-matched",
            ErrorKind::NoFhirTemplate => "no-fhir-template",
            ErrorKind::MissingCorrelationId => "missing-correlation-id",
            ErrorKind::InvalidValue => "invalid-value",
            ErrorKind::WindowTooLarge => "window-too-large",
            ErrorKind::IdentifierTooLong => "identifier-too-long",
            ErrorKind::IdentityNotFound => "identity-not-found",
            ErrorKind::IdentityAmbiguous => "identity-ambiguous",
            ErrorKind::IdentityNotDefined => "identity-not-defined",
            ErrorKind::PatientMismatch => "patient-mismatch",
            ErrorKind::EncounterNotFound => "encounter-not-found",
            ErrorKind::FhirRejected => "fhir-rejected",
            ErrorKind::FhirUnavailable => "fhir-unavailable",
            ErrorKind::FhirInvalidResponse => "fhir-invalid-response",
            ErrorKind::FhirAuth => "fhir-auth",
            ErrorKind::FhirConflict => "fhir-conflict",
            ErrorKind::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for ErrorKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Why a message was not (wholly) persisted: its kind, and text naming what to fix (the template,
/// the expression, the field, the HTTP status).
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Failure {
        Failure { kind, message: message.into() }
    }
}
