//! Device mappings: `CollectionContent` of `CalculatedContent`, `JsonPathContent`,
//! `IotJsonPathContent` and `IotCentralJsonPathContent`, and the normalization they perform.

use super::expression::{self, Expression, Input, Language, Token};
use super::jsonpath::Scope;
use super::{Members, Reader, TemplateError, TemplateErrors, kind_name, wrapped};
use crate::model::kind::ErrorKind;
use crate::model::measurement::{Measurement, Property};
use crate::model::time;
use jmespath::Rcvar;
use jsonc_parser::ast::Value as Node;
use serde_json::Value;
use std::cell::OnceCell;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentKind {
    Calculated,
    JsonPath,
    IotJsonPath,
    IotCentralJsonPath,
}

impl ContentKind {
    pub fn name(self) -> &'static str {
        match self {
            ContentKind::Calculated => "CalculatedContent",
            ContentKind::JsonPath => "JsonPathContent",
            ContentKind::IotJsonPath => "IotJsonPathContent",
            ContentKind::IotCentralJsonPath => "IotCentralJsonPathContent",
        }
    }

    fn parse(s: &str) -> Option<ContentKind> {
        [ContentKind::Calculated, ContentKind::JsonPath, ContentKind::IotJsonPath, ContentKind::IotCentralJsonPath]
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
    }

    /// CalculatedContent evaluates against the whole event with the match added as `matchedToken`;
    /// the older kinds evaluate against the matched token alone.
    fn sees_whole_event(self) -> bool {
        self == ContentKind::Calculated
    }
}

/// Fixed expressions of the IoT kinds, as the reference hard-codes them.
const IOT_DEVICE_ID: &str = "$.SystemProperties.iothub-connection-device-id";
const IOT_CREATION_TIME: &str = "$.Properties.iothub-creation-time-utc";
const IOT_ENQUEUED_TIME: &str = "$.SystemProperties.iothub-enqueuedtime";
const IOT_CENTRAL_DEVICE_ID: &str = "$.deviceId";
const IOT_CENTRAL_TIME: &str = "$.enqueuedTime";

#[derive(Debug)]
pub struct DeviceTemplate {
    pub kind: ContentKind,
    pub type_name: Arc<str>,
    /// Line of the template in the mapping file, for messages that point back to it.
    pub line: usize,
    pub column: usize,
    type_match: Expression,
    device_id: Expression,
    /// Tried in order; the first that selects something is used (IoT Hub's enqueued-time fallback).
    timestamp: Vec<Expression>,
    patient_id: Option<Expression>,
    encounter_id: Option<Expression>,
    correlation_id: Option<Expression>,
    pub values: Vec<ValueSpec>,
    /// Whether a JMESPath match must also be turned into JSON (a JSONPath expression reads it).
    match_as_json: bool,
}

#[derive(Debug)]
pub struct ValueSpec {
    pub name: Arc<str>,
    pub line: usize,
    pub column: usize,
    pub required: bool,
    expression: Expression,
}

/// What one template made of one message (see `DeviceMapping::explain`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TemplateReport {
    /// e.g. `CalculatedContent 'heartrate'`.
    pub template: String,
    pub line: usize,
    pub column: usize,
    #[serde(rename = "typeMatchExpression")]
    pub type_match: String,
    /// Tokens the typeMatchExpression found.
    pub matches: usize,
    /// Measurements produced (0 when an expression failed).
    pub measurements: usize,
    /// The first failure: the field, the expression and the reason.
    pub error: Option<String>,
    /// The expression that failed, as written in the mapping: the debugger finds its line by it.
    #[serde(rename = "errorExpression", skip_serializing_if = "Option::is_none")]
    pub error_expression: Option<String>,
}

#[derive(Debug, Default)]
pub struct DeviceMapping {
    pub templates: Vec<DeviceTemplate>,
}

/// Why a message could not be normalized. Every variant names what to look at.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NormalizeError {
    #[error("message is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("template '{type_name}' ({kind}): {field} `{expression}` {reason}")]
    Expression { type_name: String, kind: &'static str, field: String, expression: String, reason: String },
    #[error("template '{type_name}' ({kind}): required {field} is missing, null or empty (`{expression}`)")]
    MissingValue { type_name: String, kind: &'static str, field: String, expression: String },
}

impl NormalizeError {
    /// A stable name for metrics and dead-letter headers.
    pub fn kind(&self) -> ErrorKind {
        match self {
            NormalizeError::InvalidJson(_) => ErrorKind::InvalidJson,
            NormalizeError::Expression { .. } => ErrorKind::ExpressionError,
            NormalizeError::MissingValue { .. } => ErrorKind::MissingValue,
        }
    }
}

impl DeviceMapping {
    /// Loads a mapping; any problem rejects the whole file, with every problem listed.
    pub fn parse(text: &str) -> Result<DeviceMapping, TemplateErrors> {
        let (mapping, errors) = Self::parse_partial(text);
        if errors.is_empty() { Ok(mapping) } else { Err(TemplateErrors(errors)) }
    }

    /// The valid templates and the problems of the others (what a mapping debugger shows).
    pub fn parse_partial(text: &str) -> (DeviceMapping, Vec<TemplateError>) {
        let mut r = Reader::new(text);
        let mut mapping = DeviceMapping::default();
        if let Some(root) = r.parse() {
            read_collection(&mut r, &root, &mut mapping);
        }
        (mapping, r.errors)
    }

    /// Projects one message envelope (`{"Body", "Properties", "SystemProperties"}`) into
    /// measurements, in template order then match order.
    pub fn normalize(&self, event: &Value) -> Result<Vec<Measurement>, NormalizeError> {
        let event_var: OnceCell<Result<Rcvar, String>> = OnceCell::new();
        let jmes_event = || event_var.get_or_init(|| expression::to_variable(event)).clone();
        let mut out = Vec::new();
        for t in &self.templates {
            t.extract(event, &jmes_event, &mut out)?;
        }
        Ok(out)
    }

    /// Why each template did or did not produce measurements from this message: how many tokens
    /// its typeMatchExpression found, how many measurements came out, and the first expression
    /// that failed (the same error `normalize` would stop on). For the mapping debugger, so that
    /// "no measurement" is never a mystery.
    pub fn explain(&self, event: &Value) -> Vec<TemplateReport> {
        let event_var: OnceCell<Result<Rcvar, String>> = OnceCell::new();
        let jmes_event = || event_var.get_or_init(|| expression::to_variable(event)).clone();
        self.templates
            .iter()
            .map(|t| {
                let root_input = Input { scope: Scope { root: event, matched: None }, jmes: &jmes_event };
                let matched = t.type_match.select_all(&root_input).map(|m| m.len());
                let mut out = Vec::new();
                let failure = match &matched {
                    Ok(_) => t.extract(event, &jmes_event, &mut out).err(),
                    Err(why) => Some(t.error(Field::Member("typeMatchExpression"), &t.type_match, why.clone())),
                };
                let error_expression = match &failure {
                    Some(
                        NormalizeError::Expression { expression, .. } | NormalizeError::MissingValue { expression, .. },
                    ) => Some(expression.clone()),
                    _ => None,
                };
                let error = failure.map(|e| e.to_string());
                TemplateReport {
                    template: format!("{} '{}'", t.kind.name(), t.type_name),
                    line: t.line,
                    column: t.column,
                    type_match: t.type_match.text.clone(),
                    matches: matched.unwrap_or(0),
                    measurements: if error.is_some() { 0 } else { out.len() },
                    error,
                    error_expression,
                }
            })
            .collect()
    }

    /// Parses a whole `{"Body", "Properties", "SystemProperties"}` envelope and normalizes it.
    pub fn normalize_event_bytes(&self, bytes: &[u8]) -> Result<Vec<Measurement>, NormalizeError> {
        let event: Value = serde_json::from_slice(bytes).map_err(|e| NormalizeError::InvalidJson(e.to_string()))?;
        self.normalize(&event)
    }

    /// Parses a message body and normalizes it in the empty envelope the command line uses.
    pub fn normalize_body(&self, body: &[u8]) -> Result<Vec<Measurement>, NormalizeError> {
        let body: Value = serde_json::from_slice(body).map_err(|e| NormalizeError::InvalidJson(e.to_string()))?;
        self.normalize(&envelope(body))
    }
}

/// The evaluation document MedTech templates are written against.
pub fn envelope(body: Value) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("Body".into(), body);
    m.insert("Properties".into(), Value::Object(Default::default()));
    m.insert("SystemProperties".into(), Value::Object(Default::default()));
    Value::Object(m)
}

/// Which part of a template an error is about; rendered only when an error is reported.
#[derive(Clone, Copy)]
enum Field<'a> {
    Member(&'static str),
    Value(&'a str),
}

impl std::fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Field::Member(m) => f.write_str(m),
            Field::Value(name) => write!(f, "value '{name}'"),
        }
    }
}

impl DeviceTemplate {
    /// Whether any expression but the type match is JSONPath (and so needs the match as JSON).
    fn reads_match_with_jsonpath(&self) -> bool {
        let mut exprs =
            [Some(&self.device_id), self.patient_id.as_ref(), self.encounter_id.as_ref(), self.correlation_id.as_ref()]
                .into_iter()
                .flatten()
                .chain(&self.timestamp)
                .chain(self.values.iter().map(|v| &v.expression));
        exprs.any(|e| e.language() == Language::JsonPath)
    }

    fn error(&self, field: Field<'_>, e: &Expression, reason: impl Into<String>) -> NormalizeError {
        NormalizeError::Expression {
            type_name: self.type_name.to_string(),
            kind: self.kind.name(),
            field: field.to_string(),
            expression: e.text.clone(),
            reason: reason.into(),
        }
    }

    fn missing(&self, field: Field<'_>, e: &Expression) -> NormalizeError {
        NormalizeError::MissingValue {
            type_name: self.type_name.to_string(),
            kind: self.kind.name(),
            field: field.to_string(),
            expression: e.text.clone(),
        }
    }

    fn extract(
        &self,
        event: &Value,
        jmes_event: &dyn Fn() -> Result<Rcvar, String>,
        out: &mut Vec<Measurement>,
    ) -> Result<(), NormalizeError> {
        let root_input = Input { scope: Scope { root: event, matched: None }, jmes: jmes_event };
        let matches = self
            .type_match
            .select_all(&root_input)
            .map_err(|why| self.error(Field::Member("typeMatchExpression"), &self.type_match, why))?;
        for m in &matches {
            // A JMESPath match becomes JSON only for the JSONPath expressions that read it.
            let json;
            let matched: &Value = match m {
                Token::Json(v) => v,
                Token::Jmes(_) if self.match_as_json => {
                    json = m.to_json();
                    &json
                }
                Token::Jmes(_) => &Value::Null,
            };
            let match_var: OnceCell<Result<Rcvar, String>> = OnceCell::new();
            let jmes_match = || match_var.get_or_init(|| expression::with_matched_token(&jmes_event()?, m)).clone();
            let input = if self.kind.sees_whole_event() {
                Input { scope: Scope { root: event, matched: Some(matched) }, jmes: &jmes_match }
            } else {
                Input { scope: Scope { root: matched, matched: None }, jmes: &jmes_match }
            };
            out.push(self.measurement(&input)?);
        }
        Ok(())
    }

    fn one<'a>(
        &self,
        field: Field<'_>,
        e: &Expression,
        input: &Input<'a>,
    ) -> Result<Option<Token<'a>>, NormalizeError> {
        e.select_one(input).map_err(|why| self.error(field, e, why))
    }

    /// A text value; `None` for absent or null. Whitespace-only text counts as absent where the
    /// value is required (the reference's IsNullOrWhiteSpace check).
    fn text(
        &self,
        field: Field<'_>,
        e: &Expression,
        input: &Input<'_>,
        required: bool,
    ) -> Result<Option<String>, NormalizeError> {
        let v = self.one(field, e, input)?.and_then(|t| t.text());
        match v {
            Some(s) if required && s.trim().is_empty() => Err(self.missing(field, e)),
            None if required => Err(self.missing(field, e)),
            v => Ok(v),
        }
    }

    fn optional_id(
        &self,
        field: Field<'_>,
        e: &Option<Expression>,
        input: &Input<'_>,
    ) -> Result<Option<String>, NormalizeError> {
        match e {
            Some(e) => Ok(self.text(field, e, input, false)?.filter(|s| !s.trim().is_empty())),
            None => Ok(None),
        }
    }

    fn measurement(&self, input: &Input<'_>) -> Result<Measurement, NormalizeError> {
        let device_id =
            self.text(Field::Member("deviceIdExpression"), &self.device_id, input, true)?.unwrap_or_default();
        let occurrence_time = self.timestamp(input)?;
        let patient_id = self.optional_id(Field::Member("patientIdExpression"), &self.patient_id, input)?;
        let encounter_id = self.optional_id(Field::Member("encounterIdExpression"), &self.encounter_id, input)?;
        let correlation_id = match &self.correlation_id {
            Some(e) => self.text(Field::Member("correlationIdExpression"), e, input, true)?,
            None => None,
        };
        let mut properties = Vec::with_capacity(self.values.len());
        for v in &self.values {
            if let Some(value) = self.text(Field::Value(&v.name), &v.expression, input, v.required)? {
                properties.push(Property { name: v.name.clone(), value });
            }
        }
        Ok(Measurement {
            type_name: self.type_name.clone(),
            occurrence_time,
            ingestion_time: None,
            device_id,
            patient_id,
            encounter_id,
            correlation_id,
            properties,
        })
    }

    fn timestamp(&self, input: &Input<'_>) -> Result<chrono::DateTime<chrono::Utc>, NormalizeError> {
        const FIELD: Field<'static> = Field::Member("timestampExpression");
        for e in &self.timestamp {
            let Some(token) = self.one(FIELD, e, input)? else {
                continue;
            };
            if token.is_null() {
                continue;
            }
            return match token.as_str() {
                Some(s) => time::parse(s).ok_or_else(|| self.error(FIELD, e, format!("selected '{s}', which is not a date-time"))),
                None if token.is_number() => Err(self.error(
                    FIELD,
                    e,
                    format!(
                        "selected the number {}; epoch times need {{\"value\": \"fromUnixTimestamp(...)\" or \"fromUnixTimestampMs(...)\", \"language\": \"JmesPath\"}}",
                        token.text().unwrap_or_default()
                    ),
                )),
                None => Err(self.error(FIELD, e, format!("selected {}, not a date-time string", token.kind_name()))),
            };
        }
        Err(self.missing(FIELD, self.timestamp.last().unwrap_or(&self.device_id)))
    }
}

fn read_collection(r: &mut Reader<'_>, root: &Node<'_>, mapping: &mut DeviceMapping) {
    let Some(w) = wrapped(r, root, "the device mapping") else {
        return;
    };
    if !w.template_type.eq_ignore_ascii_case("CollectionContent") {
        r.error(
            w.at,
            format!(
                "a device mapping's templateType must be CollectionContent, not '{}' (is this a FHIR mapping?)",
                w.template_type
            ),
        );
        return;
    }
    let Node::Array(items) = w.template else {
        r.error(
            w.template,
            format!("the CollectionContent 'template' must be an array of templates, not {}", kind_name(w.template)),
        );
        return;
    };
    for item in &items.elements {
        r.context = None;
        if let Some(t) = read_template(r, item) {
            mapping.templates.push(t);
        }
    }
    r.context = None;
}

const COMMON: [&str; 7] = [
    "typeName",
    "typeMatchExpression",
    "deviceIdExpression",
    "timestampExpression",
    "patientIdExpression",
    "encounterIdExpression",
    "correlationIdExpression",
];

fn read_template(r: &mut Reader<'_>, item: &Node<'_>) -> Option<DeviceTemplate> {
    let w = wrapped(r, item, "a device template")?;
    let Some(kind) = ContentKind::parse(&w.template_type) else {
        w.unknown_type(
            r,
            format!(
                "unknown templateType '{}'; use CalculatedContent, JsonPathContent, IotJsonPathContent or IotCentralJsonPathContent",
                w.template_type
            ),
        );
        return None;
    };
    let Node::Object(obj) = w.template else {
        r.error(w.template, format!("the {} 'template' must be an object", kind.name()));
        return None;
    };
    let mut allowed: Vec<&str> = COMMON.to_vec();
    allowed.push("values");
    if kind == ContentKind::Calculated {
        allowed.push("defaultExpressionLanguage");
    }
    let errors_before = r.errors.len();
    let (line, column) = r.pos(obj.range.start);
    r.context = Some(kind.name().to_string());
    let m = Members::read(r, obj, &allowed, kind.name());
    let type_name = read_type_name(r, &m, item, kind);
    let default = read_default_language(r, &m, item);
    let calc = kind == ContentKind::Calculated;
    let expr = |r: &mut Reader<'_>, name: &str, required: bool| expression::read(r, &m, name, required, default, calc);
    let type_match = expr(r, "typeMatchExpression", true);
    let (device_id, timestamp) = read_device_and_time(r, kind, expr)?;
    let patient_id = expr(r, "patientIdExpression", false);
    let encounter_id = expr(r, "encounterIdExpression", false);
    let correlation_id = expr(r, "correlationIdExpression", false);
    let values = read_values(r, &m, default, calc);
    if r.errors.len() > errors_before {
        return None;
    }
    let mut t = DeviceTemplate {
        kind,
        type_name: type_name?.into(),
        line,
        column,
        type_match: type_match?,
        device_id: device_id?,
        timestamp: timestamp?,
        patient_id,
        encounter_id,
        correlation_id,
        values,
        match_as_json: false,
    };
    t.match_as_json = t.reads_match_with_jsonpath();
    Some(t)
}

fn read_type_name(r: &mut Reader<'_>, m: &Members<'_, '_>, item: &Node<'_>, kind: ContentKind) -> Option<String> {
    let type_name = m.string(r, "typeName", true).filter(|s| {
        let blank = s.trim().is_empty();
        if blank {
            r.error(m.get("typeName").unwrap_or(item), "typeName is blank".into());
        }
        !blank
    });
    if let Some(t) = &type_name {
        r.context = Some(format!("{} '{}'", kind.name(), t));
    }
    type_name
}

fn read_default_language(r: &mut Reader<'_>, m: &Members<'_, '_>, item: &Node<'_>) -> Language {
    match m.string(r, "defaultExpressionLanguage", false) {
        None => Language::JsonPath,
        Some(l) => Language::parse(&l).unwrap_or_else(|| {
            r.error(
                m.get("defaultExpressionLanguage").unwrap_or(item),
                format!("unknown defaultExpressionLanguage '{l}'; use JsonPath or JmesPath"),
            );
            Language::JsonPath
        }),
    }
}

/// The outer `None` is a fixed expression that does not compile: the template is given up there,
/// before its optional members are read.
fn read_device_and_time(
    r: &mut Reader<'_>,
    kind: ContentKind,
    expr: impl Fn(&mut Reader<'_>, &str, bool) -> Option<Expression>,
) -> Option<(Option<Expression>, Option<Vec<Expression>>)> {
    Some(match kind {
        ContentKind::Calculated | ContentKind::JsonPath => {
            (expr(r, "deviceIdExpression", true), expr(r, "timestampExpression", true).map(|e| vec![e]))
        }
        // The IoT kinds read fixed places; the reference ignores these two members if given.
        ContentKind::IotJsonPath => {
            (fixed(IOT_DEVICE_ID), Some(vec![fixed(IOT_CREATION_TIME)?, fixed(IOT_ENQUEUED_TIME)?]))
        }
        ContentKind::IotCentralJsonPath => (fixed(IOT_CENTRAL_DEVICE_ID), Some(vec![fixed(IOT_CENTRAL_TIME)?])),
    })
}

fn fixed(text: &str) -> Option<Expression> {
    Expression::compile(text, Language::JsonPath).ok()
}

fn read_values(r: &mut Reader<'_>, m: &Members<'_, '_>, default: Language, calc: bool) -> Vec<ValueSpec> {
    let mut out = Vec::new();
    let Some(items) = m.array(r, "values", false) else {
        return out;
    };
    for item in items {
        let Node::Object(obj) = item else {
            r.error(item, format!("each entry of 'values' must be an object, not {}", kind_name(item)));
            continue;
        };
        let vm = Members::read(r, obj, &["valueName", "valueExpression", "required"], "a value");
        let name = vm.string(r, "valueName", true);
        if name.as_deref().is_some_and(|n| n.trim().is_empty()) {
            r.error(item, "valueName is blank".into());
        }
        let expression = expression::read(r, &vm, "valueExpression", true, default, calc);
        let required = vm.boolean(r, "required").unwrap_or(false);
        if let (Some(name), Some(expression)) = (name, expression) {
            if out.iter().any(|v: &ValueSpec| *v.name == *name) {
                r.error(item, format!("valueName '{name}' is used twice in this template"));
            }
            let (line, column) = r.pos(obj.range.start);
            out.push(ValueSpec { name: name.into(), line, column, required, expression });
        }
    }
    out
}

#[cfg(test)]
mod explain_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn explain_says_which_templates_matched_and_which_expression_failed() {
        let mapping = DeviceMapping::parse(
            &json!({"templateType": "CollectionContent", "template": [
                {"templateType": "CalculatedContent", "template": {
                    "typeName": "hr", "typeMatchExpression": "$..[?(@heartRate)]",
                    "deviceIdExpression": "$.matchedToken.deviceId",
                    "timestampExpression": "$.matchedToken.time",
                    "values": [{"valueName": "hr", "valueExpression": "$.matchedToken.heartRate", "required": true}]}},
                {"templateType": "CalculatedContent", "template": {
                    "typeName": "spo2", "typeMatchExpression": "$..[?(@spo2)]",
                    "deviceIdExpression": "$.matchedToken.deviceId",
                    "timestampExpression": "$.matchedToken.time",
                    "values": [{"valueName": "spo2", "valueExpression": "$.matchedToken.spo2", "required": true}]}}
            ]})
            .to_string(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let report = mapping.explain(&envelope(json!({"deviceId": "d1", "heartRate": 70})));
        assert_eq!(report.len(), 2);
        assert_eq!((report[0].matches, report[0].measurements), (1, 0));
        let why = report[0].error.clone().unwrap_or_default();
        assert!(why.contains("timestampExpression") && why.contains("$.matchedToken.time"), "{why}");
        assert_eq!((report[1].matches, report[1].measurements, report[1].error.clone()), (0, 0, None));
        assert_eq!(report[1].template, "CalculatedContent 'spo2'");
    }

    #[test]
    fn an_unknown_template_type_is_reported_at_the_member_with_the_templates_name() {
        let text = "{\"templateType\": \"CollectionContent\", \"template\": [\n  {\n    \"templateType\": \"CalculatedContnet\",\n    \"template\": {\"typeName\": \"hr\"}\n  }\n]}";
        let (mapping, errors) = DeviceMapping::parse_partial(text);
        assert!(mapping.templates.is_empty());
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!((errors[0].line, errors[0].column), (3, 21), "{}", errors[0]);
        assert_eq!(errors[0].template.as_deref(), Some("template 'hr'"));
        assert!(errors[0].message.contains("unknown templateType 'CalculatedContnet'"), "{}", errors[0]);
    }
}
