//! FHIR mappings: `CollectionFhir` of `CodeValueFhir` templates.

use super::{Members, Reader, TemplateError, TemplateErrors, kind_name, wrapped};
use jsonc_parser::ast::Value as Node;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeriodInterval {
    /// -1: one Observation per correlation id, spanning its readings.
    CorrelationId,
    /// 0: one Observation per reading time.
    Single,
    /// 60: one Observation per UTC hour.
    Hourly,
    /// 1440: one Observation per UTC day.
    Daily,
}

impl PeriodInterval {
    fn from_number(n: i64) -> Option<Self> {
        match n {
            -1 => Some(Self::CorrelationId),
            0 => Some(Self::Single),
            60 => Some(Self::Hourly),
            1440 => Some(Self::Daily),
            _ => None,
        }
    }

    fn from_name(s: &str) -> Option<Self> {
        let s = s.trim();
        if let Ok(n) = s.parse::<i64>() {
            return Self::from_number(n);
        }
        [
            ("CorrelationId", Self::CorrelationId),
            ("Single", Self::Single),
            ("Hourly", Self::Hourly),
            ("Daily", Self::Daily),
        ]
        .into_iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(s))
        .map(|(_, p)| p)
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Code {
    pub code: Option<String>,
    pub system: Option<String>,
    pub display: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Category {
    pub text: Option<String>,
    pub codes: Vec<Code>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ValueKind {
    SampledData { default_period_ms: u64, unit: Option<String> },
    Quantity { unit: Option<String>, code: Option<String>, system: Option<String> },
    String,
    CodeableConcept { text: Option<String>, codes: Vec<Code> },
}

impl ValueKind {
    pub fn name(&self) -> &'static str {
        match self {
            ValueKind::SampledData { .. } => "SampledData",
            ValueKind::Quantity { .. } => "Quantity",
            ValueKind::String => "String",
            ValueKind::CodeableConcept { .. } => "CodeableConcept",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValueTemplate {
    pub value_name: String,
    pub kind: ValueKind,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    pub codes: Vec<Code>,
    pub value: ValueTemplate,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CodeValueTemplate {
    pub type_name: String,
    pub line: usize,
    pub column: usize,
    pub codes: Vec<Code>,
    pub category: Vec<Category>,
    /// The interval as written.
    pub period_interval: PeriodInterval,
    pub value: Option<ValueTemplate>,
    pub components: Vec<Component>,
}

impl CodeValueTemplate {
    /// Every value template, the main one first.
    pub fn value_templates(&self) -> impl Iterator<Item = &ValueTemplate> {
        self.value.iter().chain(self.components.iter().map(|c| &c.value))
    }

    /// Quantity and String hold one reading, so such templates are not grouped over a window:
    /// each reading becomes its own instant Observation (what the MedTech docs describe; the
    /// reference fails the group instead — a deliberate difference).
    pub fn effective_interval(&self) -> PeriodInterval {
        let single_valued =
            self.value_templates().any(|v| matches!(v.kind, ValueKind::Quantity { .. } | ValueKind::String));
        if single_valued { PeriodInterval::Single } else { self.period_interval }
    }
}

#[derive(Debug, Default)]
pub struct FhirMapping {
    pub templates: Vec<CodeValueTemplate>,
    by_type: HashMap<String, usize>,
}

impl FhirMapping {
    pub fn parse(text: &str) -> Result<FhirMapping, TemplateErrors> {
        let (mapping, errors) = Self::parse_partial(text);
        if errors.is_empty() { Ok(mapping) } else { Err(TemplateErrors(errors)) }
    }

    pub fn parse_partial(text: &str) -> (FhirMapping, Vec<TemplateError>) {
        let mut r = Reader::new(text);
        let mut mapping = FhirMapping::default();
        if let Some(root) = r.parse() {
            read_collection(&mut r, &root, &mut mapping);
        }
        (mapping, r.errors)
    }

    /// The template for a measurement type; type names match case-insensitively.
    pub fn template(&self, type_name: &str) -> Option<&CodeValueTemplate> {
        // Called per measurement: skip the lowercase copy when the name is lowercase already.
        let i = if type_name.chars().any(|c| c.to_lowercase().ne(std::iter::once(c))) {
            self.by_type.get(&type_name.to_lowercase())
        } else {
            self.by_type.get(type_name)
        };
        i.map(|&i| &self.templates[i])
    }
}

fn read_collection(r: &mut Reader<'_>, root: &Node<'_>, mapping: &mut FhirMapping) {
    let Some(w) = wrapped(r, root, "the FHIR mapping") else {
        return;
    };
    if !w.template_type.eq_ignore_ascii_case("CollectionFhir")
        && !w.template_type.eq_ignore_ascii_case("CollectionFhirTemplate")
    {
        r.error(
            w.at,
            format!(
                "a FHIR mapping's templateType must be CollectionFhir, not '{}' (is this a device mapping?)",
                w.template_type
            ),
        );
        return;
    }
    let Node::Array(items) = w.template else {
        r.error(
            w.template,
            format!("the CollectionFhir 'template' must be an array of templates, not {}", kind_name(w.template)),
        );
        return;
    };
    for item in &items.elements {
        r.context = None;
        let Some(t) = read_template(r, item) else {
            continue;
        };
        let key = t.type_name.to_lowercase();
        if let Some(&first) = mapping.by_type.get(&key) {
            let first_line = mapping.templates[first].line;
            r.error(
                item,
                format!("duplicate template for typeName '{}' (first defined on line {first_line})", t.type_name),
            );
            continue;
        }
        mapping.by_type.insert(key, mapping.templates.len());
        mapping.templates.push(t);
    }
    r.context = None;
}

fn read_template(r: &mut Reader<'_>, item: &Node<'_>) -> Option<CodeValueTemplate> {
    let w = wrapped(r, item, "a FHIR template")?;
    if !w.template_type.eq_ignore_ascii_case("CodeValueFhir") {
        w.unknown_type(r, format!("unknown templateType '{}'; use CodeValueFhir", w.template_type));
        return None;
    }
    let Node::Object(obj) = w.template else {
        r.error(w.template, "the CodeValueFhir 'template' must be an object".into());
        return None;
    };
    let errors_before = r.errors.len();
    let (line, column) = r.pos(obj.range.start);
    r.context = Some("CodeValueFhir".into());
    let m = Members::read(
        r,
        obj,
        &["typeName", "codes", "category", "periodInterval", "value", "components"],
        "CodeValueFhir",
    );
    let type_name = m.string(r, "typeName", true);
    match &type_name {
        Some(t) if t.trim().is_empty() => r.error(m.get("typeName").unwrap_or(item), "typeName is blank".into()),
        Some(t) => r.context = Some(format!("CodeValueFhir '{t}'")),
        None => {}
    }
    let codes = read_codes(r, &m, "codes");
    let category = read_categories(r, &m);
    let period_interval = match m.get("periodInterval") {
        None | Some(Node::NullKeyword(_)) => Some(PeriodInterval::Single),
        Some(Node::NumberLit(n)) => n.value.parse().ok().and_then(PeriodInterval::from_number),
        Some(Node::StringLit(s)) => PeriodInterval::from_name(&s.value),
        Some(_) => None,
    };
    if period_interval.is_none() {
        r.error(
            m.get("periodInterval").unwrap_or(item),
            "periodInterval must be 0 (Single), 60 (Hourly), 1440 (Daily) or -1 (CorrelationId)".into(),
        );
    }
    let value = m.get("value").and_then(|v| read_value(r, v, "value"));
    let mut components = Vec::new();
    for c in m.array(r, "components", false).unwrap_or_default() {
        let Node::Object(cobj) = c else {
            r.error(c, format!("each component must be an object, not {}", kind_name(c)));
            continue;
        };
        let cm = Members::read(r, cobj, &["codes", "value"], "a component");
        let codes = read_codes(r, &cm, "codes");
        if let Some(v) = cm.required(r, "value").and_then(|v| read_value(r, v, "component value")) {
            components.push(Component { codes, value: v });
        }
    }
    if m.get("value").is_none() && components.is_empty() && r.errors.len() == errors_before {
        r.error(
            item,
            "the template has neither a 'value' nor 'components': it would produce empty Observations".into(),
        );
    }
    if r.errors.len() > errors_before {
        return None;
    }
    Some(CodeValueTemplate {
        type_name: type_name?,
        line,
        column,
        codes,
        category,
        period_interval: period_interval?,
        value,
        components,
    })
}

fn read_codes(r: &mut Reader<'_>, m: &Members<'_, '_>, name: &str) -> Vec<Code> {
    let mut out = Vec::new();
    for c in m.array(r, name, false).unwrap_or_default() {
        let Node::Object(obj) = c else {
            r.error(c, format!("each entry of '{name}' must be an object with code, system and display"));
            continue;
        };
        let cm = Members::read(r, obj, &["code", "system", "display"], "a code");
        out.push(Code {
            code: cm.string(r, "code", false),
            system: cm.string(r, "system", false),
            display: cm.string(r, "display", false),
        });
    }
    out
}

fn read_categories(r: &mut Reader<'_>, m: &Members<'_, '_>) -> Vec<Category> {
    let mut out = Vec::new();
    for c in m.array(r, "category", false).unwrap_or_default() {
        let Node::Object(obj) = c else {
            r.error(c, "each category must be an object with text and codes".into());
            continue;
        };
        let cm = Members::read(r, obj, &["text", "codes"], "a category");
        out.push(Category { text: cm.string(r, "text", false), codes: read_codes(r, &cm, "codes") });
    }
    out
}

fn read_value(r: &mut Reader<'_>, node: &Node<'_>, what: &str) -> Option<ValueTemplate> {
    let Node::Object(obj) = node else {
        r.error(node, format!("{what} must be an object, not {}", kind_name(node)));
        return None;
    };
    const ALLOWED: [&str; 8] = ["valueName", "valueType", "defaultPeriod", "unit", "code", "system", "text", "codes"];
    let m = Members::read(r, obj, &ALLOWED, what);
    let value_name = m.string(r, "valueName", true);
    if value_name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        r.error(node, format!("{what}: valueName is blank"));
    }
    let value_type = m.string(r, "valueType", true)?;
    let unexpected = |r: &mut Reader<'_>, members: &[&str]| {
        for name in members {
            if let Some(p) = m.prop(name) {
                r.error(p, format!("'{name}' does not apply to a {value_type} value"));
            }
        }
    };
    let kind = match value_type.to_ascii_lowercase().as_str() {
        "sampleddata" => {
            unexpected(r, &["code", "system", "text", "codes"]);
            let period = match m.integer(r, "defaultPeriod") {
                Some(p) if p > 0 => Some(p as u64),
                Some(p) => {
                    r.error(
                        m.get("defaultPeriod").unwrap_or(node),
                        format!("defaultPeriod must be a positive number of milliseconds, not {p}"),
                    );
                    None
                }
                None => {
                    if m.get("defaultPeriod").is_none() {
                        r.error(
                            node,
                            "a SampledData value needs 'defaultPeriod' (milliseconds between samples)".into(),
                        );
                    }
                    None
                }
            };
            ValueKind::SampledData { default_period_ms: period?, unit: m.string(r, "unit", false) }
        }
        "quantity" => {
            unexpected(r, &["defaultPeriod", "text", "codes"]);
            ValueKind::Quantity {
                unit: m.string(r, "unit", false),
                code: m.string(r, "code", false),
                system: m.string(r, "system", false),
            }
        }
        "string" => {
            unexpected(r, &["defaultPeriod", "unit", "code", "system", "text", "codes"]);
            ValueKind::String
        }
        "codeableconcept" => {
            unexpected(r, &["defaultPeriod", "unit", "code", "system"]);
            ValueKind::CodeableConcept { text: m.string(r, "text", false), codes: read_codes(r, &m, "codes") }
        }
        _ => {
            r.error(
                m.get("valueType").unwrap_or(node),
                format!("unknown valueType '{value_type}'; use SampledData, Quantity, String or CodeableConcept"),
            );
            return None;
        }
    };
    Some(ValueTemplate { value_name: value_name?, kind })
}
